"""The LUT's token axis (issue 15): measured on a real ORT-CPU session, interpolated, merges charged."""

import numpy as np
import pytest

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.profiling.table import LatencyTable, reachable_grids, token_axis
from vitrim.profiling.build import build_lut
from tests.conftest import TINY_PCFG


@pytest.fixture(scope="module")
def tok_lut(tiny_spec, tmp_path_factory):
    axis = token_axis(tiny_spec, 3, 2)
    path = tmp_path_factory.mktemp("lut_tok") / "lut.json"
    pcfg = ProfileConfig(**dict(TINY_PCFG, embed_points=1, head_points=1, mlp_points=1, checks=1, calibration_plans=3))
    return build_lut(tiny_spec, Target(batch=4, threads=1), pcfg, Floors(), 8, path, progress=False, tokens=axis), path


def test_token_axis_spans_the_reachable_counts(tiny_spec):
    # 4x4 grid + class token; two merges reach down to 1x1
    assert set(reachable_grids(tiny_spec, 1)) == {(4, 4), (4, 2), (2, 4), (2, 2)}
    assert token_axis(tiny_spec, 3, 2) == [2, 5, 17]
    assert token_axis(tiny_spec, 0, 1) == [5, 9, 17]


def test_lut_with_a_token_axis_builds_reloads_and_interpolates(tok_lut, tiny_spec):
    lut, path = tok_lut
    assert lut.grid.tokens == [2, 5, 17] and lut.attn.shape[0] == 3 and lut.mlp.shape[0] == 3
    again = LatencyTable.load(path, expect=lut.signature)
    assert np.array_equal(again.attn, lut.attn) and np.array_equal(again.merge, lut.merge)
    E, H, Q, V, M = 32, 2, 16, 16, 64
    g = lut.grid
    at = {T: lut.block_ms(E, H, Q, V, M, T=T) for T in g.tokens}
    assert at[17] > at[2]  # fewer tokens, less time (16x fewer rows in every GEMM)
    for T in g.tokens:  # grid points are reproduced exactly
        want = lut.attn[g.tokens.index(T), -1, -1, -1, -1] + lut.mlp[g.tokens.index(T), -1, -1] + lut.block_correction_ms
        assert at[T] == pytest.approx(want, rel=1e-12)
    # between token points: the attention by the quadratic through the three points, the MLP linearly
    attn = [lut.attn_ms(T, E, H, Q, V) for T in g.tokens]
    quad = np.polyval(np.polyfit(g.tokens, attn, 2), 9)
    w = (9 - 5) / (17 - 5)
    mlp = (1 - w) * lut.mlp_ms(5, E, M) + w * lut.mlp_ms(17, E, M)
    assert lut.block_ms(E, H, Q, V, M, T=9) == pytest.approx(quad + mlp + lut.block_correction_ms, rel=1e-9)
    assert (lut.merge[1:] > 0).all()  # a merge costs something where one is possible
    assert any(c["tokens"] for c in lut.calibration)  # the composition saw merged plans


def test_token_interpolation_is_exact_for_the_attentions_quadratic_term(tok_lut):
    """Planted: an attention costing a T + b T^2 (its scores and weighted sum grow with T^2), an MLP a T: the
    table reproduces them between its token points, where linear interpolation would not."""
    import copy

    lut = copy.deepcopy(tok_lut[0])
    T = np.asarray(lut.grid.tokens, dtype=np.float64)
    lut.attn = np.broadcast_to((0.01 * T + 0.002 * T ** 2)[:, None, None, None, None], lut.attn.shape).copy()
    lut.mlp = np.broadcast_to((0.03 * T)[:, None, None], lut.mlp.shape).copy()
    lut.block_correction_ms, lut._fi = 0.0, None
    for t in (3, 9, 13, 17):
        assert lut.block_ms(32, 2, 16, 16, 64, T=t) == pytest.approx(0.04 * t + 0.002 * t ** 2, rel=1e-9)
    linear = 0.5 * (lut.block_ms(32, 2, 16, 16, 64, T=5) + lut.block_ms(32, 2, 16, 16, 64, T=17))
    assert abs(linear / lut.block_ms(32, 2, 16, 16, 64, T=11) - 1) > 0.05  # what linear interpolation would miss


def test_marginal_of_a_merge_is_the_predicted_difference(tok_lut, tiny_spec):
    lut, _ = tok_lut
    full = Plan.full(tiny_spec)
    for block, kind in [(0, "hw"), (1, "w"), (1, "h")]:
        after = full.copy().set_merges({block: kind})
        assert lut.marginal(full, block, "merge", merge_type=kind) == pytest.approx(lut.predict(full) - lut.predict(after))
    # on planted costs (blocks growing with T, cheap merges; measured tiny merges can cost what they save):
    import copy

    lut = copy.deepcopy(lut)
    T = np.asarray(lut.grid.tokens, dtype=np.float64)
    lut.attn = np.broadcast_to((0.01 * T + 0.002 * T ** 2)[:, None, None, None, None], lut.attn.shape).copy()
    lut.mlp = np.broadcast_to((0.03 * T)[:, None, None], lut.mlp.shape).copy()
    lut.merge, lut._fi = np.broadcast_to((0.001 * T)[:, None], lut.merge.shape).copy(), None
    one = full.copy().set_merges({0: "w"})
    # a merge changes every later block's token count: after one merge, a second one is worth less
    assert 0 < lut.marginal(one, 1, "merge", merge_type="w") < lut.marginal(full, 1, "merge", merge_type="w")
    # the 2-block tiny model merged to a 1x1 grid before block 0 is the fastest thing the table knows
    two = full.copy().set_merges({0: "hw", 1: "hw"})
    assert lut.predict(two) < lut.predict(one) < lut.predict(full)


def test_a_lut_without_token_axis_refuses_merged_plans(tiny_lut, tiny_spec):
    lut, _ = tiny_lut
    assert lut.grid.tokens == [17]
    with pytest.raises(UserError, match="prune_tokens"):
        lut.predict(Plan.full(tiny_spec).set_merges({1: "w"}))


def test_token_axis_settings_are_validated(tiny_cfg):
    from vitrim.pipeline.core.config import validate_config
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, search=dataclasses.replace(tiny_cfg.search, prune_tokens=True, strategy="slim"))
    with pytest.raises(UserError, match="prune_tokens"):
        validate_config(cfg)
    cfg = dataclasses.replace(tiny_cfg, search=dataclasses.replace(tiny_cfg.search, prune_tokens=True),
                              profile=dataclasses.replace(tiny_cfg.profile, token_points=1))
    with pytest.raises(UserError, match="token_points"):
        validate_config(cfg)
