"""Measured budgets: the LUT steers the search, the engine decides.

Two steps around the search of ``vitrim run`` (issue 14; DESIGN.md "Closed loop"):

* **Anchor** (:func:`anchor_budget`): a budget in ms is turned into a ratio
  through the teacher measured on the target when the run starts, not through
  LUT milliseconds from another hour (a shared VM drifts +-20-40% between hours).
* **Closed loop** (:func:`closed_loop`): the searched plan is exported and timed
  interleaved with the teacher. When the measured ratio misses the requested one
  by more than ``search.measured_tolerance``, the budget handed to the LUT is
  rescaled by the miss (the LUT's error on this plan's ratio is assumed to hold
  for plans next to it), the plan is pruned or refilled to it with the search's
  own selection (:func:`~vitrim.pipeline.stages.search.prune_to`,
  :func:`~vitrim.pipeline.stages.search.refill`), and measured again, for at
  most ``search.measured_rounds`` rounds. Corrections keep the strategy's own
  constraints (:func:`~vitrim.pipeline.stages.search.searched_config`: a
  width-only ``magnitude`` or ``slim`` plan never loses a block to a correction).
  The tolerance is symmetric (``|measured / requested - 1| <= tolerance``); a
  loop that ends without meeting it (rounds spent, or a correction that gives a
  plan already measured) returns the measured plan closest to the requested
  ratio (the faster one on a tie), not the last one, and says it did not converge.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


from vitrim.pipeline.core.config import RunConfig, SearchConfig
from vitrim.pipeline.core.plan import BlockPlan, Floors, Plan
from vitrim.pipeline.stages.search import Candidate, LatencyCost, prune_to, refill, searched_config

Measure = Callable[[Plan], tuple[float, float]]  # plan -> (teacher ms, student ms), one interleaved session


@dataclass
class LoopResult:
    plan: Plan  # the converged plan, else the measured plan closest to the requested ratio
    requested: float  # requested ratio to the teacher (measured)
    rounds: list = field(default_factory=list)
    converged: bool = False
    chosen_round: int = 0  # the round that measured ``plan``
    plans: list = field(default_factory=list)  # every measured plan, by round


def is_latency_budget(s: SearchConfig) -> bool:
    return s.flops_fraction is None and s.params_fraction is None


def removed_pool(plan: Plan, scores: dict, align: int, per_dim: int = 4) -> list[Candidate]:
    """Groups the plan lacks (against the teacher), most salient first, as refill candidates.

    Only the ``per_dim`` most salient chunks of each (block, dim) are offered:
    a correction moves the plan by a few groups, and the pool stays small.
    """
    s = plan.spec
    out: list[Candidate] = []

    def chunks(missing: list[int], sc, step: int) -> list[list[int]]:
        order = sorted(missing, key=lambda u: (-float(sc[u]), u))
        return [sorted(order[i:i + step]) for i in range(0, len(order), step)][:per_dim]

    miss = [u for u in range(s["embed_dim"]) if u not in set(plan.embed_keep)]
    for units in chunks(miss, scores["embed"], align):
        out.append(Candidate(None, "embed", units, float(sum(scores["embed"][u] for u in units))))
    full = {"heads": s["num_heads"], "qk": s["head_dim"], "v": s["head_dim"], "mlp": s["mlp_hidden"]}
    for i, b in enumerate(plan.blocks):
        if not b.keep:
            snap = BlockPlan(True, *[list(range(full[d])) for d in ("heads", "qk", "v", "mlp")])
            out.append(Candidate(i, "block", [], float(scores[f"b{i}.block"].sum()), snapshot=snap))
            continue
        for dim in ("heads", "qk", "v", "mlp"):
            have = set(getattr(b, dim))
            sc = scores[f"b{i}.{dim}"]
            for units in chunks([u for u in range(full[dim]) if u not in have], sc, 1 if dim == "heads" else align):
                out.append(Candidate(i, dim, units, float(sum(sc[u] for u in units))))
    return out


def correct_plan(plan: Plan, lut, scores: dict, cfg: SearchConfig, e_min: int, budget_ms: float) -> Plan:
    """Prune (then refill) or refill ``plan`` to the LUT budget ``budget_ms`` with the search's selection,
    under the constraints of the strategy that made it."""
    cfg = searched_config(cfg)
    cost = LatencyCost(lut)
    if cost.predict(plan) > budget_ms:
        plan, removed = prune_to(plan, scores, cost, budget_ms, "knapsack", cfg, e_min)
        # the last removal can overshoot by a whole block or an embedding chunk: fill back with any group
        plan, _ = refill(plan, removed + removed_pool(plan, scores, cfg.align), cost, budget_ms)
        return plan
    plan, _ = refill(plan, removed_pool(plan, scores, cfg.align), cost, budget_ms)
    return plan


def closed_loop(plan: Plan, lut, requested: float, measure: Measure, scores: dict, cfg: SearchConfig, e_min: int,
                log: Callable[[str], None] = print) -> LoopResult:
    """Measure ``plan`` against the teacher and correct it until the ratio is within tolerance.

    Each round records the LUT budget the plan was made for, the predicted and
    measured ratios, the miss, and the corrected budget for the next round (all
    as fractions of the teacher). Corrections use ``cfg`` as the plan's strategy
    searched under it (:func:`~vitrim.pipeline.stages.search.searched_config`).
    Without convergence the result is the measured plan closest to ``requested``.
    """
    cfg = searched_config(cfg)
    t_pred = lut.predict(Plan.full(lut.spec))
    budget = plan.meta.get("budget", requested * t_pred) if plan.meta.get("unit", "ms") == "ms" else requested * t_pred
    res = LoopResult(plan, requested)
    seen = set()
    for r in range(cfg.measured_rounds + 1):
        t_ms, s_ms = measure(plan)
        m, p = s_ms / t_ms, lut.predict(plan) / t_pred
        miss = m / requested - 1.0
        rec = {"round": r, "budget_ratio": budget / t_pred, "predicted_ratio": p, "measured_ratio": m,
               "teacher_ms": t_ms, "student_ms": s_ms, "miss_pct": 100.0 * miss, "corrected_budget_ratio": None}
        res.rounds.append(rec)
        res.plans.append(plan)
        if abs(miss) <= cfg.measured_tolerance:
            res.converged = True
            log(f"[measure] round {r}: predicted {p:.1%}, measured {m:.1%} of the teacher (requested {requested:.1%}, "
                f"{100 * miss:+.1f}%): within +-{cfg.measured_tolerance:.0%}")
            break
        if r == cfg.measured_rounds:
            log(f"[measure] round {r}: measured {m:.1%} of the teacher, {100 * miss:+.1f}% off the requested "
                f"{requested:.1%}; no correction rounds left (search.measured_rounds={cfg.measured_rounds})")
            break
        # the LUT's error on this plan's ratio (m / p) is assumed to hold for the plans next to it
        budget = t_pred * p * requested / m
        rec["corrected_budget_ratio"] = budget / t_pred
        seen.add((plan.embed_dim, tuple(plan.block_dims())))
        new = correct_plan(plan, lut, scores, cfg, e_min, budget)
        log(f"[measure] round {r}: predicted {p:.1%}, measured {m:.1%} of the teacher (requested {requested:.1%}, "
            f"{100 * miss:+.1f}%); correcting: LUT budget {rec['budget_ratio']:.1%} -> {budget / t_pred:.1%}, "
            f"new plan predicted {lut.predict(new) / t_pred:.1%}")
        key = (new.embed_dim, tuple(new.block_dims()))
        if key in seen:  # the grain of the groups cannot express the correction
            rec["note"] = "the correction gives a plan already measured; stopped"
            log("[measure] the corrected plan equals one already measured; stopping")
            break
        new.meta = {**plan.meta, "budget": budget, "predicted": lut.predict(new)}
        plan = new
    res.chosen_round = len(res.rounds) - 1
    if not res.converged:  # the closest measured plan; on a tie the faster one (a budget is an upper bound)
        res.chosen_round = min(range(len(res.rounds)), key=lambda i: (abs(res.rounds[i]["miss_pct"]),
                                                                       res.rounds[i]["measured_ratio"]))
        c = res.rounds[res.chosen_round]
        log(f"[measure] did NOT converge to within +-{cfg.measured_tolerance:.0%} of the requested {requested:.1%} "
            f"in {len(res.rounds)} measurements: keeping round {res.chosen_round}'s plan, the closest measured "
            f"({c['measured_ratio']:.1%} of the teacher, {c['miss_pct']:+.1f}%)")
    res.plan = res.plans[res.chosen_round]
    return res


# ---------------------------------------------------------------------------
# vitrim run glue: real exports, timed interleaved on the target


class PairTimer:
    """``__call__(plan)`` exports the teacher and the sliced student and times both round-robin.

    A context manager: exported files live in a temporary directory until exit.
    """

    def __init__(self, cfg: RunConfig, teacher_state: dict, spec: dict):
        from vitrim.export.target import Target

        self.cfg, self.state, self.spec = cfg, teacher_state, spec
        self.target = Target.from_config(cfg.target)
        self.shape = (spec["in_chans"], *spec["img_size"])
        self.n = 0
        self._tmp = None

    def __enter__(self) -> "PairTimer":
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="vitrim-measure-")
        self.workdir = Path(self._tmp.name)
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def _runner(self, state: dict, plan: Plan, name: str):
        from vitrim.export.engine import runner_for_module
        from vitrim.pipeline.core.slicing import slice_model

        return runner_for_module(slice_model(state, plan), self.shape, self.target, self.workdir, name)

    def time(self, runners: list) -> list:
        from vitrim.export.runners import time_interleaved

        p = self.cfg.profile
        for r in runners:
            r.activate()
        try:  # a ratio of two models: at least 60 runs in 12 rounds, so one burst of load cannot decide it
            return time_interleaved(runners, self.target.batch, max(60, p.repeats), max(12, p.rounds), p.warmup)
        finally:
            for r in runners:
                r.deactivate()

    def teacher_ms(self) -> float:
        return self.time([self._runner(self.state, Plan.full(self.spec), "anchor_teacher")])[0].median_ms

    def __call__(self, plan: Plan, student_state: Optional[dict] = None) -> tuple[float, float]:
        self.n += 1
        t, s = self.time([self._runner(self.state, Plan.full(self.spec), f"teacher{self.n}"),
                          self._runner(student_state or self.state, plan, f"student{self.n}")])
        return t.median_ms, s.median_ms


def anchor_budget(cfg: RunConfig, timer: PairTimer, log: Callable[[str], None] = print) -> tuple[RunConfig, dict]:
    """Turn ``search.budget_ms`` into a fraction through the teacher measured now; other budgets pass through."""
    if cfg.search.budget_ms is None or not is_latency_budget(cfg.search):
        return cfg, {}
    t_ms = timer.teacher_ms()
    frac = cfg.search.budget_ms / t_ms
    if not 0.0 < frac <= 1.0:
        from vitrim.pipeline.core.errors import UserError

        raise UserError("search", f"budget {cfg.search.budget_ms:.3f} ms is {frac:.0%} of the teacher, measured "
                        f"{t_ms:.3f} ms on the target now", "set a budget below the teacher's measured latency, or "
                        "use search.budget_fraction")
    c = copy.deepcopy(cfg)
    c.search.budget_ms, c.search.budget_fraction = None, frac
    info = {"budget_ms": cfg.search.budget_ms, "teacher_measured_ms": t_ms, "fraction": frac}
    log(f"[measure] budget {cfg.search.budget_ms:.3f} ms anchored on the teacher measured now ({t_ms:.3f} ms): "
        f"{frac:.1%} of the teacher")
    return c, info


def saliency_for(cfg: RunConfig, teacher, state: dict, plan: Plan, train_ds) -> dict:
    """The search's own scores of the adapted weights at ``plan``, for the correction step:
    Hessian-aware saliency (knapsack, nvit), or L1 magnitude for the ``magnitude`` baseline."""
    from vitrim.pipeline.core.data import make_loader
    from vitrim.pipeline.core.slicing import full_size_compact
    from vitrim.pipeline.stages.distill import make_kd_fn
    from vitrim.pipeline.stages.saliency import attach_gates, detach_gates, hessian_scores
    from vitrim.pipeline.stages.search import masks_from_plan

    from vitrim.pipeline.core.device import resolve_device

    device = resolve_device(cfg.device)
    student, _ = full_size_compact(teacher)
    student.load_state_dict(state)
    if cfg.search.strategy == "magnitude":
        from vitrim.pipeline.stages.saliency import magnitude_scores

        raw = magnitude_scores(student)
        return {k: v / (v.mean() + 1e-12) for k, v in raw.items()}
    student.to(device)
    teacher.to(device).eval()
    gates = attach_gates(student, masks_from_plan(plan))
    student.set_token_merges(plan.merges)  # the plan's network, token merges included (they stay as searched)
    loader = make_loader(train_ds, cfg.data.batch_size, shuffle=True, seed=cfg.search.seed + 1, drop_last=True,
                         workers=cfg.data.workers, pin_memory=device.startswith("cuda"))
    it = iter(loader)
    batches = [tuple(t.to(device) for t in next(it)) for _ in range(max(1, min(cfg.search.saliency_batches, len(loader))))]
    scores = hessian_scores(student, gates, make_kd_fn(teacher, cfg.finetune.alpha, cfg.finetune.temperature), batches)
    detach_gates(student)
    teacher.cpu()
    return scores


def stage_closed_loop(cfg: RunConfig, teacher, lut, res, splits, out_dir: Path, anchor: dict, timer: PairTimer,
                      log: Callable[[str], None] = print) -> LoopResult:
    """The closed loop after the search; rewrites ``plan.json`` and writes ``measured_budget.json``."""
    from vitrim.pipeline.core.io import atomic_write_json, read_json

    out_dir = Path(out_dir)
    requested = requested_ratio(cfg)
    scfg = searched_config(cfg.search)  # the strategy's constraints hold for its corrections too
    e_min = lut.grid.embed[0] if scfg.prune_embed else lut.spec["embed_dim"]
    scores = saliency_for(cfg, teacher, res.state, res.plan, splits.train) if cfg.search.measured_rounds else {}
    loop = closed_loop(res.plan, lut, requested, lambda p: timer(p, res.state), scores, scfg, e_min, log=log)
    plan = loop.plan.validate(Floors(cfg.search.min_heads, cfg.search.min_qk, cfg.search.min_v, cfg.search.min_mlp))
    plan.save(out_dir / "plan.json")
    info = {"requested": requested, "tolerance": cfg.search.measured_tolerance, "anchor": anchor,
            "converged": loop.converged, "chosen_round": loop.chosen_round, "rounds": loop.rounds}
    atomic_write_json(out_dir / "measured_budget.json", info)
    slog = read_json(out_dir / "search_log.json", "search", "search log", "rerun the search")
    slog["closed_loop"] = info
    atomic_write_json(out_dir / "search_log.json", slog)
    loop.plan = plan
    return loop


def add_to_summary(summary: dict, out: Path, same) -> None:
    """Put the closed loop's rounds and the delivered engine's measured ratio into the run summary."""
    p = Path(out) / "search" / "measured_budget.json"
    if not p.is_file():
        return
    import json

    m = json.loads(p.read_text())
    if same is not None:  # teacher and delivered student re-timed round-robin at the end of the run
        ratio = same[1].median_ms / same[0].median_ms
    else:
        ratio = summary["student"]["measured_ms"] / summary["teacher"]["measured_ms"]
    m["delivered"] = {"measured_ratio": ratio, "within": abs(ratio / m["requested"] - 1.0) <= m["tolerance"]}
    summary["measured_budget"] = m


def requested_ratio(cfg: RunConfig) -> float:
    """The fraction of the teacher's latency asked for (after anchoring)."""
    s = cfg.search
    return s.budget_fraction if s.budget_fraction is not None else 0.5


def report_lines(s: dict) -> list[str]:
    """The report's "Latency budget, measured" section, from the run summary."""
    m = s.get("measured_budget")
    if not m:
        return []
    lines = ["", "## Latency budget, measured", ""]
    a = m.get("anchor") or {}
    if a:
        lines.append(f"The budget {a['budget_ms']:.3f} ms was anchored on the teacher measured on the target when the "
                     f"run started ({a['teacher_measured_ms']:.3f} ms), i.e. {a['fraction']:.1%} of the teacher; LUT "
                     f"milliseconds from the build were not used for it.  ")
    lines.append(f"Requested: {m['requested']:.1%} of the teacher's latency; tolerance +-{m['tolerance']:.0%} "
                 f"(`search.measured_tolerance`). Each round exports the plan and times it round-robin with the "
                 f"teacher in one session.")
    lines += ["", "| round | LUT budget | predicted | measured | miss | corrected budget |", "|---:|---:|---:|---:|---:|---:|"]
    for r in m["rounds"]:
        cb = "" if r["corrected_budget_ratio"] is None else f"{r['corrected_budget_ratio']:.1%}"
        lines.append(f"| {r['round']} | {r['budget_ratio']:.1%} | {r['predicted_ratio']:.1%} | {r['measured_ratio']:.1%} "
                     f"| {r['miss_pct']:+.1f}% | {cb} |")
    if not m.get("converged", True):
        k = m.get("chosen_round", len(m["rounds"]) - 1)
        c = m["rounds"][k]
        lines += ["", f"**The closed loop did not converge**: no measured plan came within +-{m['tolerance']:.0%} of "
                  f"the requested {m['requested']:.1%} in {len(m['rounds'])} measurements. The plan kept is round "
                  f"{k}'s, the closest measured ({c['measured_ratio']:.1%} of the teacher, {c['miss_pct']:+.1f}%); "
                  "raise `search.measured_rounds` or `search.measured_tolerance` (or `profile.repeats` on a "
                  "noisy machine)."]
    d = m.get("delivered")
    if d:
        lines += ["", f"**Delivered engine: {d['measured_ratio']:.1%} of the teacher, measured "
                  f"({100 * (d['measured_ratio'] / m['requested'] - 1):+.1f}% off the requested {m['requested']:.1%}; "
                  f"{'within' if d['within'] else 'outside'} +-{m['tolerance']:.0%}).**"]
    return lines
