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
  ran with, with its strategy's scores; the chosen plan and every round are written.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Optional

from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION, RunConfig
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

    rd = RunDir(out_dir).mkdir()
    student, _ = full_size_compact(teacher)
    res = run_search(teacher, student, lut, cfg.search, splits.train, splits.val, batch_size=cfg.data.batch_size,
                     kd_alpha=cfg.finetune.alpha, kd_T=cfg.finetune.temperature, log=log,
                     device=resolve_device(cfg.device), workers=cfg.data.workers)
    teacher.cpu()
    res.plan.save(rd.plan)
    atomic_write_json(rd.search_log, search_log(res))
    save_weights(res.state, rd.search_state)
    plot_widths(res.plan, rd.widths_plot, f"{cfg.search.strategy}: kept widths per block "
                f"(embed {res.plan.embed_dim}/{lut.spec['embed_dim']})")
    log(f"[search] done in {res.wall_s:.0f}s: predicted {lut.predict(res.plan):.3f} ms, "
        f"{res.plan.num_params() / 1e6:.3f}M params; wrote {rd.plan}")
    return res


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

        raise UserError("search", f"budget {cfg.search.budget_ms:.3f} ms is {frac:.0%} of the teacher, measured "
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


def correction_scores(cfg: RunConfig, teacher, res: SearchResult, train_ds) -> dict:
    """The search's own scores of its adapted weights at its plan, for the correction step (the strategy's
    :meth:`~vitrim.pipeline.search.base.Strategy.correction_scores`), on the run's device."""
    from vitrim.pipeline.core.data import make_loader
    from vitrim.pipeline.core.device import resolve_device
    from vitrim.pipeline.core.distill import make_kd_fn
    from vitrim.pipeline.core.slicing import full_size_compact

    device = resolve_device(cfg.device)
    student, _ = full_size_compact(teacher)
    student.load_state_dict(res.state)

    def inputs():
        student.to(device)
        teacher.to(device).eval()
        loader = make_loader(train_ds, cfg.data.batch_size, shuffle=True, seed=res.config.seed + 1, drop_last=True,
                             workers=cfg.data.workers, pin_memory=device.startswith("cuda"))
        it = iter(loader)
        n = max(1, min(res.config.saliency_batches, len(loader)))
        return (make_kd_fn(teacher, cfg.finetune.alpha, cfg.finetune.temperature),
                [tuple(t.to(device) for t in next(it)) for _ in range(n)])

    try:
        return strategy(res.config.strategy)().correction_scores(student, res.plan, inputs)
    finally:
        teacher.cpu()


def stage_closed_loop(cfg: RunConfig, teacher, lut, res: SearchResult, splits, out_dir: str | os.PathLike,
                      anchor: dict, timer: PairTimer, log: Callable[[str], None] = print) -> LoopResult:
    """The closed loop after the search, under the configuration the search ran with (``res.config``);
    rewrites the plan and the search log, writes the rounds (``measured_budget``)."""
    rd = RunDir(out_dir)
    scfg = res.config  # the strategy's constraints hold for its corrections too
    requested = requested_ratio(cfg)
    scores = correction_scores(cfg, teacher, res, splits.train) if scfg.measured_rounds else {}
    loop = closed_loop(res.plan, lut, requested, lambda p: timer(p, res.state), scores, scfg, embed_floor(scfg, lut),
                       log=log)
    plan = loop.plan.validate(Floors.from_config(scfg))
    plan.save(rd.plan)
    info = {"requested": requested, "tolerance": scfg.measured_tolerance, "anchor": anchor,
            "converged": loop.converged, "chosen_round": loop.chosen_round, "rounds": loop.rounds}
    atomic_write_json(rd.measured_budget, info)
    atomic_write_json(rd.search_log, {**search_log(res), "closed_loop": info})
    loop.plan = plan
    return loop
