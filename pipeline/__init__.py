"""``vitrim.pipeline``: the model side of vitrim, in three layers.

* :mod:`vitrim.pipeline.core` - below ``export``: config, data, the timm adapter,
  the Plan, CompactViT, slicing, the training loop and KD loss, the RunDir, atomic I/O, errors.
* :mod:`vitrim.pipeline.search` - above ``profiling``: the search algorithms (a registry of
  strategies, group keys, costs, saliency, selection, the closed loop); no files, CLI or plots.
* :mod:`vitrim.pipeline.stages` - the top: one module per subcommand (teacher, profile, search,
  slice, fine-tune, release, run); :mod:`vitrim.pipeline.report` writes the run's report and
  :mod:`vitrim.pipeline.cli` is the command.

This namespace only re-exports the error types so the import stays cheap and
free of optional backends.
"""
from vitrim.pipeline.core.errors import InternalError, UserError, VitrimError

__all__ = ["VitrimError", "UserError", "InternalError"]
