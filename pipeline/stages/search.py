"""``vitrim search``, and the closed loop of ``vitrim run`` (issue 14): the search's stage glue.

* :func:`stage_search` runs the strategy the config names
  (:func:`vitrim.pipeline.search.run_search`) and writes the plan, the search
  log, the adapted weights and the widths plot into a :class:`RunDir`.
* **Anchor** (:func:`anchor_budget`): a budget in ms is turned into a ratio
  through the teacher measured on the target when the run starts, not through
  LUT milliseconds from another hour (a shared VM drifts +-20-40% between hours).
* **Closed loop** (:func:`stage_closed_loop`): the searched plan is exported and
  timed interleaved with the teacher (:class:`PairTimer`), and corrected by
  :func:`vitrim.pipeline.search.closed_loop` under the configuration the search
  ran with, with its strategy's scores; every corrected plan's weights are adapted to it
  (:class:`CorrectionWeights`); the chosen plan, its weights and every round are written.
"""
from __future__ import annotations

import copy
import os
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION, RunConfig, pct
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.search import (LoopResult, SearchResult, closed_loop, embed_floor, is_latency_budget, run_search,
                                    strategy)


def search_log(res: SearchResult) -> dict:
    """The search log's record of a search."""
    return {"strategy": res.config.strategy, "align": res.config.align, "budget": res.budget, "unit": res.unit,
            "budget_desc": res.budget_desc,
            "wall_s": round(res.wall_s, 1), "steps": res.log}


def stage_search(cfg: RunConfig, teacher, lut, splits, out_dir: str | os.PathLike,
                 log: Callable[[str], None] = print) -> SearchResult:
    """Search a plan; writes the plan, the search log, the widths plot and the adapted weights."""
    from vitrim.pipeline.core.device import resolve_device
    from vitrim.pipeline.core.models import save_weights
    from vitrim.pipeline.core.slicing import full_size_compact
    from vitrim.pipeline.report import plot_widths

    student, full = full_size_compact(teacher)
    start = search_start(cfg, full.spec)
    if start is not None:
        student.load_state_dict(start[1])
        log(f"[search] starting from {cfg.search.start_from}'s plan and its "
            f"{'fine-tuned student' if cfg.search.start_weights == 'student' else 'adapted weights'}")
    rd = RunDir(out_dir).mkdir()
    res = run_search(teacher, student, lut, cfg.search, splits.train, splits.val, batch_size=cfg.data.batch_size,
                     kd_alpha=cfg.finetune.alpha, kd_T=cfg.finetune.temperature, log=log,
                     device=resolve_device(cfg.device), workers=cfg.data.workers,
                     start=start[0] if start is not None else None)
    teacher.cpu()
    res.plan.save(rd.plan)
    atomic_write_json(rd.search_log, search_log(res))
    save_weights(res.state, rd.search_state)
    plot_widths(res.plan, rd.widths_plot, f"{cfg.search.strategy}: kept widths per block "
                f"(embed {res.plan.embed_dim}/{lut.spec['embed_dim']})")
    log(f"[search] done in {res.wall_s:.0f}s: predicted {lut.predict(res.plan):.3f} ms, "
        f"{res.plan.num_params() / 1e6:.3f}M params; wrote {rd.plan}")
    return res


def search_start(cfg: RunConfig, spec: dict) -> Optional[tuple[Plan, dict]]:
    """The plan and the full-size weights a search continues from (``search.start_from``, a progressive curve's
    previous point), or None.

    ``search.start_weights``: ``search``, the adapted weights that run's search (and closed loop) ended with;
    ``student``, those with its fine-tuned student written back on the units its plan kept.
    """
    from vitrim.pipeline.core.errors import UserError
    from vitrim.pipeline.core.models import read_state_dict
    from vitrim.pipeline.core.slicing import load_compact, unslice_state

    s = cfg.search
    if not s.start_from:
        return None
    prev = RunDir(s.start_from)
    src = prev.search_dir
    fix = "point it at a finished `vitrim run` directory searched on this teacher, or leave search.start_from unset"
    need = [src.plan, src.search_state] + ([prev.plan, prev.student] if s.start_weights == "student" else [])
    lacking = [str(p) for p in need if not p.is_file()]
    if lacking:
        raise UserError("search", f"search.start_from='{s.start_from}' lacks {', '.join(lacking)}", fix)
    plan = Plan.load(src.plan)
    shape = Plan.from_dict(Plan.full(spec).to_dict()).spec  # as a saved plan spells it (lists, not tuples)
    bad = [k for k in shape if k not in ("arch", "kwargs") and plan.spec.get(k) != shape[k]]
    if bad:
        raise UserError("search", f"search.start_from='{s.start_from}' holds a plan of another teacher ({bad[0]}: "
                        f"plan {plan.spec.get(bad[0])!r}, teacher {shape[bad[0]]!r})", fix)
    state = read_state_dict(src.search_state, "search")
    if s.start_weights == "student":
        state = unslice_state(state, load_compact(prev.root).state_dict(), Plan.load(prev.plan))
    return plan, state


def start_key(cfg: RunConfig) -> Optional[list]:
    """What a search started from an earlier run depends on: the files it reads (path, size, mtime)."""
    s = cfg.search
    if not s.start_from:
        return None
    prev = RunDir(s.start_from)
    files = [prev.search_dir.plan, prev.search_dir.search_state]
    if s.start_weights == "student":
        files += [prev.plan, prev.student]  # what search_start reads: the student and the plan it was sliced by
    return [f"{os.path.abspath(f)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" if f.is_file() else str(f)
            for f in files]


# ---------------------------------------------------------------------------
# vitrim run: the budget anchored on the target, and the closed loop on real exports


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
        from vitrim.export.runners import interleaved, time_interleaved

        p = self.cfg.profile
        # a ratio of two models: at least 60 runs in 12 rounds, so one burst of load cannot decide it
        with interleaved(runners) as rs:
            return time_interleaved(rs, self.target.batch, max(60, p.repeats), max(12, p.rounds), p.warmup)

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

        raise UserError("search", f"budget {cfg.search.budget_ms:.3f} ms is {pct(frac)} of the teacher, measured "
                        f"{t_ms:.3f} ms on the target now", "set a budget below the teacher's measured latency, or "
                        "use search.budget_fraction")
    c = copy.deepcopy(cfg)
    c.search.budget_ms, c.search.budget_fraction = None, frac
    info = {"budget_ms": cfg.search.budget_ms, "teacher_measured_ms": t_ms, "fraction": frac}
    log(f"[measure] budget {cfg.search.budget_ms:.3f} ms anchored on the teacher measured now ({t_ms:.3f} ms): "
        f"{frac:.1%} of the teacher")
    return c, info


def wants_closed_loop(cfg: RunConfig) -> bool:
    """A latency budget, and a strategy whose plans the loop can correct (``uniform`` has no group scores)."""
    return is_latency_budget(cfg.search) and strategy(cfg.search.strategy).correctable


def requested_ratio(cfg: RunConfig) -> float:
    """The fraction of the teacher's latency asked for (after anchoring)."""
    s = cfg.search
    return s.budget_fraction if s.budget_fraction is not None else DEFAULT_BUDGET_FRACTION


class CorrectionWeights:
    """The weights the closed loop's corrections score and the run slices: the search's adapted weights at
    round 0, and for every corrected plan the last round's weights adapted to it with ``search.kd_iters`` KD
    steps (issue 25: a re-pruned plan sliced from weights that never saw it lost half its accuracy at deep budgets).

    ``scores()`` gives the strategy's correction scores at the searched plan; ``adapt(plan)`` adapts the weights
    to ``plan`` and returns their scores there; ``state(round)`` the weights of a measured round.
    """

    def __init__(self, cfg: RunConfig, teacher, res: SearchResult, train_ds):
        from vitrim.pipeline.core.device import resolve_device
        from vitrim.pipeline.core.slicing import full_size_compact

        self.cfg, self.teacher, self.res, self.train_ds = cfg, teacher, res, train_ds
        self.device = resolve_device(cfg.device)
        self.student, _ = full_size_compact(teacher)
        self.student.load_state_dict(res.state)
        self.states = [res.state]  # by measured round

    @cached_property
    def kd(self):
        """The KD loss of the fine-tune's recipe (logits only: the correction is a search step)."""
        from vitrim.pipeline.core.distill import make_kd_fn

        return make_kd_fn(self.teacher, self.cfg.finetune.alpha, self.cfg.finetune.temperature)

    def _to_device(self) -> None:
        self.student.to(self.device)
        self.teacher.to(self.device).eval()

    def _stream(self, seed: int):
        from vitrim.pipeline.search import BatchStream

        return BatchStream(self.train_ds, self.cfg.data.batch_size, seed, self.device, self.cfg.data.workers)

    def _inputs(self):
        """(KD loss, the saliency batches) with the student and the teacher on the device."""
        self._to_device()
        stream = self._stream(self.res.config.seed + 1)
        n = max(1, min(self.res.config.saliency_batches, len(self.train_ds) // self.cfg.data.batch_size))
        return self.kd, [stream() for _ in range(n)]

    def scores(self, plan: Optional[Plan] = None) -> dict:
        """The strategy's correction scores of the current weights at ``plan`` (default: the searched plan)."""
        try:
            return strategy(self.res.config.strategy)().correction_scores(self.student, plan or self.res.plan,
                                                                           self._inputs)
        finally:
            self.teacher.cpu()

    def adapt(self, plan: Plan) -> dict:
        """Adapt the weights (carrying on from the last round's) to ``plan``; returns their scores at ``plan``."""
        import torch

        from vitrim.pipeline.search import attach_gates, detach_gates, kd_adapt, masks_from_plan

        scfg = self.res.config
        self._to_device()
        attach_gates(self.student, masks_from_plan(plan))
        self.student.set_token_merges(plan.merges)
        opt = torch.optim.AdamW(self.student.parameters(), lr=scfg.lr, weight_decay=0.0)
        try:
            kd_adapt(self.student, self.kd, self._stream(scfg.seed + 1 + len(self.states)), opt, scfg.kd_iters)
        finally:
            detach_gates(self.student)
            self.student.set_token_merges({})
            self.teacher.cpu()
        self.states.append({k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()})
        return self.scores(plan)

    def state(self, round_: int) -> dict:
        return self.states[round_]


def stage_closed_loop(cfg: RunConfig, teacher, lut, res: SearchResult, splits, out_dir: str | os.PathLike,
                      anchor: dict, timer: PairTimer, log: Callable[[str], None] = print) -> LoopResult:
    """The closed loop after the search, under the configuration the search ran with (``res.config``);
    rewrites the plan and the search log, writes the rounds (``measured_budget``)."""
    rd = RunDir(out_dir)
    scfg = res.config  # the strategy's constraints hold for its corrections too
    requested = requested_ratio(cfg)
    weights = CorrectionWeights(cfg, teacher, res, splits.train) if scfg.measured_rounds else None
    scores = weights.scores() if weights else {}
    loop = closed_loop(res.plan, lut, requested, lambda p: timer(p, res.state), scores, scfg, embed_floor(scfg, lut),
                       log=log, adapt=weights.adapt if weights else None)
    plan = loop.plan.validate(Floors.from_config(scfg))
    if loop.chosen_round:  # a corrected plan: slice the weights adapted to it (latency does not depend on them)
        from vitrim.pipeline.core.models import save_weights

        res.state = weights.state(loop.chosen_round)
        save_weights(res.state, rd.search_state)
        log(f"[measure] round {loop.chosen_round}'s plan: sliced from weights adapted to it ({scfg.kd_iters} KD steps "
            "after each correction)")
    plan.save(rd.plan)
    info = {"requested": requested, "tolerance": scfg.measured_tolerance, "anchor": anchor,
            "converged": loop.converged, "chosen_round": loop.chosen_round, "rounds": loop.rounds}
    atomic_write_json(rd.measured_budget, info)
    atomic_write_json(rd.search_log, {**search_log(res), "closed_loop": info})
    loop.plan = plan
    return loop
