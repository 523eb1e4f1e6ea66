"""Latency-aware structural search: algorithms only (no files, CLI or plots).

One strategy a file on a common base (:class:`~vitrim.pipeline.search.base.Strategy`),
registered here by name in :data:`STRATEGIES`; :func:`run_search` runs the one a
config names. Nothing else tests a strategy's name: what differs between
strategies is a class attribute or a method.

============  ===============================================  ==========================
name          what                                             file
============  ===============================================  ==========================
knapsack      HALP's knapsack on NViT's Hessian saliency        :mod:`.knapsack`
nvit          NViT's latency-regularised ranking                :mod:`.knapsack`
magnitude     the knapsack loop on L1 magnitude (width only)    :mod:`.knapsack`
uniform       one width fraction for every block               :mod:`.uniform`
compound      one fraction for the depth and every width        :mod:`.compound`
slim          ViT-Slim's latency-weighted l1 masks              :mod:`.slim`
uvc           UVC's Gumbel gates, dual ascent, block skipping   :mod:`.uvc`
============  ===============================================  ==========================

The building blocks: :mod:`.groups` (typed group keys, candidates, plan
surgery), :mod:`.cost` (latency / MACs / params, the budget),
:mod:`.saliency` (gates and scores), :mod:`.greedy` (``prune_to``, ``refill``),
:mod:`.masked` (the learned-mask loop), :mod:`.closed_loop` (measured
corrections).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import SearchConfig, validate_search
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search.base import (BatchStream, SearchContext, SearchResult, Strategy, embed_floor,
                                         fixed_merge_plan, kd_adapt)
from vitrim.pipeline.search.closed_loop import LoopResult, Measure, closed_loop, correct_plan, removed_pool
from vitrim.pipeline.search.compound import Compound, evenly_spaced
from vitrim.pipeline.search.cost import Cost, LatencyCost, MacsCost, ParamsCost, is_latency_budget, resolve_budget
from vitrim.pipeline.search.greedy import Ranking, knapsack_ratio, nvit_penalty, prune_to, refill
from vitrim.pipeline.search.groups import (EMBED, WIDTH_DIMS, Candidate, GroupKey, apply_addition, apply_removal,
                                           candidates, floor_plan, full_widths, masks_from_plan, merge_options,
                                           width_keys)
from vitrim.pipeline.search.knapsack import Knapsack, Magnitude, Nvit, StepwiseSearch
from vitrim.pipeline.search.masked import MaskedSearch
from vitrim.pipeline.search.saliency import (attach_gates, detach_gates, hessian_scores, magnitude_scores, mean_loss,
                                             merge_scores, relative_magnitude, set_gate)
from vitrim.pipeline.search.slim import Slim, fold_masks, scale_embed
from vitrim.pipeline.search.uniform import Uniform, uniform_plan
from vitrim.pipeline.search.uvc import Uvc

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Knapsack, Nvit, Slim, Uvc, Uniform, Magnitude, Compound)}


def strategy(name: str) -> type[Strategy]:
    """The registered strategy called ``name`` (config validation refuses other names)."""
    return STRATEGIES[name]


def searched_config(cfg: SearchConfig) -> SearchConfig:
    """``cfg`` as its strategy searches under it (the strategy's constraints applied)."""
    return strategy(cfg.strategy).searched_config(cfg)


def for_strategy(cfg: SearchConfig, name: str) -> SearchConfig:
    """``cfg`` for strategy ``name``: token merges and prune-finetune steps kept only where that strategy does them
    (``vitrim curve``'s baselines, the benchmark's rows)."""
    import dataclasses

    s = strategy(name)
    return dataclasses.replace(cfg, strategy=name, prune_tokens=cfg.prune_tokens and s.merges_tokens,
                               merges=cfg.merges if s.merges_tokens else None,
                               step_epochs=cfg.step_epochs if s.stepwise else 0.0)


def measured_align(cfg: SearchConfig, lut, log: Callable[[str], None] = print) -> SearchConfig:
    """``cfg`` with ``align`` raised to the alignment the LUT measured as fast on its target (widths off it
    ran slower than their neighbours' line by more than the build's tolerance), unless ``align_from_lut`` is off."""
    import dataclasses

    want = getattr(lut, "recommended_align", None)
    if not cfg.align_from_lut or not want or want <= cfg.align:
        return cfg
    log(f"[search] widths aligned to {want} (search.align {cfg.align}): the LUT measured widths off multiples of "
        f"{want} slower on this target (set search.align_from_lut: false to keep {cfg.align})")
    return dataclasses.replace(cfg, align=int(want))


def check_start(cfg, start=None) -> None:
    """``search.start_from`` (or a ``start`` plan given directly) with a strategy that cannot continue a plan:
    exit 2, before any training (the CLI and ``run_pipeline`` call this with their other fail-fast checks)."""
    if (cfg.start_from or start is not None) and not strategy(cfg.strategy).continues:
        able = ", ".join(n for n, c in STRATEGIES.items() if c.continues)
        raise UserError("search", f"strategy '{cfg.strategy}' cannot start from an earlier plan (search.start_from)",
                        f"use one of {able}, or leave search.start_from unset")


def run_search(teacher: nn.Module, student: CompactViT, lut, cfg: SearchConfig, train_ds, val_ds,
               batch_size: int = 128, kd_alpha: float = 1.0, kd_T: float = 2.0,
               log: Callable[[str], None] = print, device: str = "cpu", workers: int = 0,
               start: Optional[Plan] = None) -> SearchResult:
    """Search a plan for ``student`` (a keep-everything CompactViT of ``teacher``) under the budget, with the
    strategy ``cfg.strategy`` names.

    Saliency, the KD steps and the validation run on ``device`` (a GPU when the config has one);
    the returned weights are on the CPU. ``start``: an earlier search's plan to continue from instead of the
    teacher's widths (``student`` then holds that search's weights); only strategies that ``continue`` take one.
    """
    validate_search(cfg, "search config")
    cfg = measured_align(cfg, lut, log)
    s = strategy(cfg.strategy)
    check_start(cfg, start)
    ctx = SearchContext.build(s.searched_config(cfg), teacher, student, lut, train_ds, val_ds, batch_size=batch_size,
                              kd_alpha=kd_alpha, kd_T=kd_T, device=device, workers=workers, log=log, start=start)
    return s().search(ctx)


__all__ = [
    "STRATEGIES", "strategy", "searched_config", "for_strategy", "run_search", "measured_align",
    "Strategy", "SearchContext", "SearchResult", "BatchStream", "kd_adapt", "embed_floor", "fixed_merge_plan",
    "StepwiseSearch", "Knapsack", "Nvit", "Magnitude", "Uniform", "uniform_plan", "Compound", "evenly_spaced",
    "MaskedSearch", "Slim", "Uvc",
    "fold_masks", "scale_embed",
    "GroupKey", "EMBED", "WIDTH_DIMS", "Candidate", "width_keys", "full_widths", "apply_removal", "apply_addition",
    "floor_plan", "masks_from_plan", "merge_options", "candidates",
    "Cost", "LatencyCost", "MacsCost", "ParamsCost", "resolve_budget", "is_latency_budget",
    "attach_gates", "detach_gates", "set_gate", "hessian_scores", "merge_scores", "magnitude_scores",
    "relative_magnitude", "mean_loss",
    "Ranking", "knapsack_ratio", "nvit_penalty", "prune_to", "refill",
    "Measure", "LoopResult", "closed_loop", "correct_plan", "removed_pool",
]
