"""The ``compound`` baseline: one scale for the depth and every width (EfficientNet's compound scaling, downwards).

At scale ``s`` the plan keeps ``round(s * depth)`` blocks (at least
``search.min_blocks``), evenly spaced with the first and the last included (as
DistilBERT initialises its student from every other layer of its teacher), and
in each kept block the fraction ``s`` of the heads, QK, V and MLP units, and of
the embedding channels when ``search.prune_embed`` (down to the LUT's smallest
embedding), all ranked by L1 magnitude. ``s`` is bisected to the budget; the
depth moves in whole blocks, so the kept blocks' widths (and the embedding) are
then widened, at that depth, into what the rounding left of the budget. The
weights are the teacher's.

It is the block-skipping baseline for the deep end of the curve (issue 25): a
width-only plan keeps every block, and where the per-block work that does not
shrink with the widths dominates (49 tokens), no width-only baseline reaches
20% of the teacher. Like ``uniform`` it has no per-group scores, so the closed
loop leaves its plan as it is.
"""
from __future__ import annotations

from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.search.base import SearchContext
from vitrim.pipeline.search.saliency import magnitude_scores
from vitrim.pipeline.search.uniform import Uniform, bisect_scale, scaled_plan, scaled_width


def evenly_spaced(depth: int, n: int) -> list[int]:
    """``n`` of ``depth`` block indices, evenly spaced, the first and (for n > 1) the last included."""
    if n >= depth:
        return list(range(depth))
    if n == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (n - 1)) for i in range(n)})


class Compound(Uniform):
    """Compound scaling: the same kept fraction of the blocks, every block's widths and the embedding."""

    name = "compound"
    constraints = {"prune_blocks": True}  # it skips blocks by construction

    def plan(self, ctx: SearchContext) -> tuple[Plan, dict]:
        spec, cfg = ctx.spec, ctx.cfg
        mags = magnitude_scores(ctx.student)
        depth, E = spec["depth"], spec["embed_dim"]

        def blocks(s: float) -> int:
            return min(depth, max(cfg.min_blocks, int(s * depth + 0.5)))

        def make(s: float, w: float) -> Plan:
            embed = scaled_width(E, w, ctx.e_min, cfg.align) if cfg.prune_embed else None
            return scaled_plan(mags, spec, cfg, w, evenly_spaced(depth, blocks(s)), embed)

        _, s = bisect_scale(lambda f: make(f, f), ctx.cost, ctx.budget, "compound scaling", "raise the budget")
        # the depth moves in whole blocks: widen the kept blocks into what the rounding left of the budget
        plan, w = bisect_scale(lambda f: make(s, max(s, f)), ctx.cost, ctx.budget, "compound scaling",
                               "raise the budget")
        return plan, {"scale": round(s, 4), "width": round(max(s, w), 4)}
