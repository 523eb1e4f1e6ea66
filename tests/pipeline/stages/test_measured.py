"""The closed loop: a LUT whose ratios are off by a planted 10% is corrected in one round."""
import numpy as np
import pytest
import timm
import torch

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig, SearchConfig
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.stages.measured import closed_loop
from vitrim.pipeline.stages.search import LatencyCost, masks_from_plan, prune_to, refill
from vitrim.profiling.table import Grid, LatencyTable

DEMO_KW = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=8, num_heads=4,
               mlp_ratio=4.0, global_pool="avg", class_token=False)


def hand_made_lut(spec: dict) -> LatencyTable:
    """A table written down by hand (no timing): latency grows with every width, plus a fixed shell."""
    g = Grid.for_spec(spec, ProfileConfig(embed_points=3, head_points=0, qk_points=2, v_points=2, mlp_points=5),
                      Floors(), 8)
    E, H, Q, V = np.meshgrid(g.embed, g.heads, g.qk, g.v, indexing="ij")
    attn = 0.02 + 2e-5 * E * H * (Q + V) + 1e-3 * H
    Em, M = np.meshgrid(g.embed, g.mlp, indexing="ij")
    mlp = 0.01 + 4e-6 * Em * M
    shell = 0.3 + 2e-3 * np.asarray(g.embed, dtype=np.float64)
    return LatencyTable(Target(batch=64, threads=2).signature(Plan.full(spec).num_tokens), spec, g, attn, mlp, shell,
                        block_correction_ms=0.01)


@pytest.mark.parametrize("off", [1.10, 0.90])
def test_closed_loop_converges_in_one_round_when_the_lut_is_off_by_10pct(off):
    spec = describe(timm.create_model("vit_tiny_patch16_224", **DEMO_KW))
    lut = hand_made_lut(spec)
    cfg = SearchConfig()
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in masks_from_plan(Plan.full(spec)).items()}
    for i in range(spec["depth"]):  # a block is as important as all of its groups together
        scores[f"b{i}.block"] = sum(scores[f"b{i}.{d}"].sum() for d in ("heads", "qk", "v", "mlp")).reshape(1)
    t_pred = lut.predict(Plan.full(spec))
    requested = 0.5
    cost = LatencyCost(lut)
    plan, removed = prune_to(Plan.full(spec), scores, cost, requested * t_pred, "knapsack", cfg, lut.grid.embed[0])
    plan, _ = refill(plan, removed, cost, requested * t_pred)
    plan.meta = {"budget": requested * t_pred, "unit": "ms"}

    def measure(p):  # the planted truth: every ratio is `off` times the LUT's
        return 20.0, 20.0 * off * lut.predict(p) / t_pred

    res = closed_loop(plan, lut, requested, measure, scores, cfg, lut.grid.embed[0], log=lambda s: None)
    r0, *rest = res.rounds
    assert r0["miss_pct"] == pytest.approx(100 * (off * r0["predicted_ratio"] / requested - 1))
    assert abs(r0["miss_pct"]) > 100 * cfg.measured_tolerance  # the search's plan misses, measured
    assert r0["corrected_budget_ratio"] == pytest.approx(r0["predicted_ratio"] * requested / r0["measured_ratio"])
    assert len(rest) == 1 and res.converged  # one correction round
    assert abs(rest[0]["measured_ratio"] / requested - 1) <= cfg.measured_tolerance
    assert rest[0]["corrected_budget_ratio"] is None
    assert lut.predict(res.plan) <= r0["corrected_budget_ratio"] * t_pred + 1e-9
    res.plan.validate(Floors())
