"""What every strategy shares: the :class:`Strategy` base, the :class:`SearchContext` it reads, its :class:`SearchResult`.

A strategy is one class (one file) registered by name in
:data:`vitrim.pipeline.search.STRATEGIES`. What differs between strategies is
a method or a class attribute here, never a test of the strategy's name:

* ``constraints``: config values the strategy always searches under (a
  width-only baseline never skips a block), applied by :meth:`Strategy.searched_config`
  to the search and to every later correction of its plan;
* ``merges_tokens``: it searches token merges (``search.prune_tokens``);
* ``correctable``: the closed loop may correct its plan (it has per-group scores);
* ``stepwise``: it prunes in ``search.steps`` steps with KD between them (``search.step_epochs``);
* ``continues``: it can start from an earlier search's plan and weights (``search.start_from``, a
  progressive curve) instead of the teacher's;
* :meth:`Strategy.search`: the plan;
* :meth:`Strategy.correction_scores`: the per-group scores the closed loop
  corrects its plan with.

The :class:`SearchContext` is built once per search: the configuration as
searched, the budget and its cost model, the floors, the smallest reachable plan
(checked against the budget), the KD loss, the batch stream and the validation.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import SearchConfig
from vitrim.pipeline.core.data import TensorImages, make_loader
from vitrim.pipeline.core.distill import make_kd_fn
from vitrim.pipeline.core.errors import UnreachableBudget, UserError
from vitrim.pipeline.core.evaluate import top1
from vitrim.pipeline.core.plan import Floors, Plan, merge_valid
from vitrim.pipeline.search.cost import Cost, resolve_budget
from vitrim.pipeline.search.groups import apply_removal, floor_plan, masks_from_plan, merge_options
from vitrim.pipeline.search.saliency import attach_gates, detach_gates, hessian_scores

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SearchResult:
    plan: Plan
    state: dict  # adapted full-size weights (canonical naming), sliceable with the plan
    log: list = field(default_factory=list)
    budget: float = 0.0
    unit: str = "ms"
    budget_desc: str = ""
    wall_s: float = 0.0
    config: Optional[SearchConfig] = None  # the configuration searched under (the strategy's constraints applied)


class BatchStream:
    """An endless stream of shuffled training batches on ``device`` (a new epoch order when one runs out)."""

    def __init__(self, ds, batch_size: int, seed: int, device: str, workers: int = 0):
        self.make = lambda ep: make_loader(ds, batch_size, shuffle=True, seed=seed, drop_last=True, epoch=ep,
                                           workers=workers, pin_memory=str(device).startswith("cuda"))
        self.epoch, self.device = 0, device
        self.it = iter(self.make(0))

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.it = iter(self.make(self.epoch))
            x, y = next(self.it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def kd_adapt(student: nn.Module, kd: LossFn, next_batch: Batches, opt, iters: int) -> None:
    """``iters`` KD steps on the (gated) student, then eval mode: the search's short adaptation."""
    student.train()
    for _ in range(iters):
        x, y = next_batch()
        loss = kd(student, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    student.eval()


def fixed_merge_plan(spec: dict, cfg: SearchConfig) -> Plan:
    """The teacher's widths with ``search.merges`` in place. A merge before a block the teacher lacks, or one that
    halves a grid side of 1, is a UserError naming ``search.merges[k]`` (``vitrim run`` checks this before the
    teacher and the table)."""
    plan, depth = Plan.full(spec), spec["depth"]
    for k, m in enumerate(cfg.merges or []):
        i, kind = m["block"], m["type"]
        if not 0 <= i < depth:
            raise UserError("config", f"search.merges[{k}]: a merge before block {i}, but the teacher has blocks "
                            f"0..{depth - 1}", "give each merge the index of the block it precedes")
        grid = plan.block_grids()[i]
        if not merge_valid(grid, kind):
            raise UserError("config", f"search.merges[{k}]: merge '{kind}' before block {i} is impossible, the grid "
                            f"there is {grid[0]}x{grid[1]}", "drop that merge or merge along a side longer than 1")
        plan.set_merges({**plan.merges, i: kind})
    return plan


def embed_floor(cfg: SearchConfig, lut) -> int:
    """The embedding's floor: the LUT's smallest embedding width when the search prunes it, else the full width."""
    return lut.grid.embed[0] if cfg.prune_embed else lut.spec["embed_dim"]


@dataclass
class SearchContext:
    """Everything a strategy's search reads, built once by :meth:`build`."""

    cfg: SearchConfig  # as searched: the strategy's constraints applied
    lut: Any
    teacher: nn.Module
    student: CompactViT  # a keep-everything CompactViT of the teacher, gated and adapted in place
    train_ds: Any
    val_ds: Any
    cost: Cost
    budget: float
    desc: str  # the budget in words
    floors: Floors
    e_min: int  # the embedding's floor (the LUT's smallest embedding width when it is pruned)
    min_tokens: int  # the fewest tokens a block may get (the LUT's token axis)
    batch_size: int = 128
    kd_alpha: float = 1.0
    kd_T: float = 2.0
    device: str = "cpu"
    workers: int = 0
    log: Callable[[str], None] = print
    t0: float = field(default_factory=time.time)
    start: Optional[Plan] = None  # an earlier search's plan to continue from (``student`` holds its weights)

    @classmethod
    def build(cls, cfg: SearchConfig, teacher: nn.Module, student: CompactViT, lut, train_ds, val_ds, **kw
              ) -> "SearchContext":
        """Seed torch, resolve the budget and refuse one below the smallest plan ``cfg`` can reach."""
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        spec = lut.spec
        cost, budget, desc = resolve_budget(cfg, lut)
        e_min = embed_floor(cfg, lut)
        if (cfg.prune_tokens or cfg.merges) and len(lut.grid.tokens) < 2:
            raise UserError("search", f"search.{'prune_tokens' if cfg.prune_tokens else 'merges'} needs a LUT with a "
                            f"token axis; this one has tokens {lut.grid.tokens}", "rebuild it with `vitrim profile "
                            "build` on this config (prune_tokens on, or search.merges set)")
        min_tokens = lut.grid.tokens[0] if (cfg.prune_tokens or cfg.merges) else Plan.full(spec).num_tokens
        ctx = cls(cfg, lut, teacher, student, train_ds, val_ds, cost, budget, desc, Floors.from_config(cfg), e_min,
                  min_tokens, t0=t0, **kw)
        ctx.start_plan()  # fixed merges that do not fit the grid: refused before any work
        ctx.check_reachable()
        return ctx

    def fixed_merges(self) -> dict[int, str]:
        """``search.merges`` as {block: type}."""
        return {int(m["block"]): m["type"] for m in self.cfg.merges or []}

    def start_plan(self) -> Plan:
        """Where the search starts: the teacher's widths with the fixed merges (``search.merges``) in place, or the
        plan of an earlier search it continues (:attr:`start`: a progressive curve)."""
        if self.start is not None:
            return self.start.copy()
        plan = fixed_merge_plan(self.spec, self.cfg)
        if not plan.merges:
            return plan
        if min(plan.block_tokens()) < self.min_tokens:
            raise UserError("search", f"search.merges leave {min(plan.block_tokens())} tokens, below the LUT's token "
                            f"axis {self.lut.grid.tokens}", "rebuild the LUT for this config, or merge less")
        return plan

    def adapt_iters(self, last: bool) -> int:
        """KD steps after a pruning step: ``search.kd_iters``, or ``search.step_epochs`` epochs after every step but
        the last (NViT's prune-finetune iterations)."""
        if last or not self.cfg.step_epochs:
            return self.cfg.kd_iters
        return max(self.cfg.kd_iters, round(self.cfg.step_epochs * len(self.train_ds) / self.batch_size))

    @property
    def spec(self) -> dict:
        return self.lut.spec

    def smallest_plan(self) -> Plan:
        """The smallest plan the search may reach: the floors, and the merges that save the most (greedy)."""
        cfg = self.cfg
        smallest = floor_plan(self.spec, self.floors, self.e_min, cfg.min_blocks if cfg.prune_blocks else
                              self.spec["depth"], cfg.align)
        if cfg.merges:
            smallest.set_merges(self.fixed_merges())
        while True:
            opts = merge_options(smallest, cfg.max_merges, self.min_tokens) if cfg.prune_tokens else []
            if not opts:
                return smallest
            smallest = min((apply_removal(smallest, k) for k in opts), key=self.cost.predict)

    def check_reachable(self) -> None:
        cfg, fl, unit = self.cfg, self.floors, self.cost.unit
        lower = self.cost.predict(self.smallest_plan())
        if self.budget < lower:
            raise UnreachableBudget(f"budget {self.budget:.3f} {unit} ({self.desc}) is below the smallest reachable "
                            f"{lower:.3f} {unit} for strategy {cfg.strategy} (floors: heads>={fl.heads}, QK>={fl.qk}, "
                            f"V>={fl.v}, MLP>={fl.mlp}, embed>={self.e_min}, "
                            f"blocks>={cfg.min_blocks if cfg.prune_blocks else self.spec['depth']}"
                            + (f", tokens>={self.min_tokens} in <={cfg.max_merges} merges" if cfg.prune_tokens else "")
                            + ")", f"raise the budget above {lower:.3f} {unit} or lower the floors")

    def log_start(self, extra: str = "") -> float:
        """Log the teacher's cost and the budget; returns the teacher's cost."""
        start = self.cost.predict(Plan.full(self.spec))
        self.log(f"[search] {self.cfg.strategy}: teacher {start:.3f} {self.cost.unit} -> budget {self.budget:.3f} "
                 f"{self.cost.unit} ({self.desc}){extra}")
        return start

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)

    @cached_property
    def kd(self) -> LossFn:
        """The KD loss against the teacher (teacher and student moved to the search's device)."""
        self.teacher.to(self.device).eval()
        self.student.to(self.device)
        return make_kd_fn(self.teacher, self.kd_alpha, self.kd_T)

    @cached_property
    def batches(self) -> BatchStream:
        return BatchStream(self.train_ds, self.batch_size, self.cfg.seed, self.device, self.workers)

    def val_top1(self, n: int = 2000) -> float:
        """The student's top-1 on (the first ``n`` images of) the holdout split (held out of train/)."""
        ds = self.val_ds
        ds = ds.subset(torch.arange(min(n, len(ds)))) if isinstance(ds, TensorImages) else ds
        return top1(self.student, ds, 512, workers=self.workers)

    def result(self, plan: Plan, history: list, **meta) -> SearchResult:
        """The search's result: ``plan`` (validated against the floors) with its meta, the student's weights on
        the CPU (gates and token merges removed)."""
        detach_gates(self.student)
        self.student.set_token_merges({})
        # zero nothing: slicing drops pruned units; keep adapted weights for the slice stage
        state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        plan.meta = {"strategy": self.cfg.strategy, "budget": self.budget, "unit": self.cost.unit,
                     "predicted": self.cost.predict(plan), "budget_desc": self.desc, **meta}
        return SearchResult(plan.validate(self.floors), state, history, self.budget, self.cost.unit, self.desc,
                            time.time() - self.t0, self.cfg)


class Strategy:
    """A search strategy: one subclass a file, registered by ``name`` in :data:`vitrim.pipeline.search.STRATEGIES`."""

    name: ClassVar[str] = ""
    constraints: ClassVar[dict] = {}  # config values it always searches (and is corrected) under
    merges_tokens: ClassVar[bool] = False  # it searches token merges (search.prune_tokens)
    correctable: ClassVar[bool] = True  # the closed loop may correct its plan (it has per-group scores)
    stepwise: ClassVar[bool] = False  # it prunes in steps, with KD between them (search.step_epochs)
    continues: ClassVar[bool] = False  # it can start from an earlier search's plan and weights (search.start_from)

    @classmethod
    def searched_config(cls, cfg: SearchConfig) -> SearchConfig:
        """``cfg`` with the strategy's constraints applied: what it searches under, and what every later
        change of its plan (the closed loop's corrections) uses, so a width-only baseline stays width-only."""
        fixed = {k: v for k, v in cls.constraints.items() if getattr(cfg, k) != v}
        return dataclasses.replace(cfg, **fixed) if fixed else cfg

    def search(self, ctx: SearchContext) -> SearchResult:
        raise NotImplementedError

    def correction_scores(self, student: CompactViT, plan: Plan,
                          inputs: Callable[[], tuple[LossFn, list]]) -> dict:
        """Per-group scores of ``student`` (adapted weights) at ``plan``, for the closed loop's corrections.

        ``inputs()`` puts the student (and the teacher) on the device and returns (KD loss, batches).
        Default: Hessian-aware saliency of the plan's network, token merges included (they stay as searched).
        """
        kd, batches = inputs()
        gates = attach_gates(student, masks_from_plan(plan))
        student.set_token_merges(plan.merges)
        try:
            return hessian_scores(student, gates, kd, batches)
        finally:
            detach_gates(student)
