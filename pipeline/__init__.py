"""``vitrim.pipeline``: the model side of vitrim, in two layers.

* :mod:`vitrim.pipeline.core` - below ``export``: config, data, the timm adapter,
  the Plan, CompactViT, slicing, the training loop, atomic I/O, errors.
* :mod:`vitrim.pipeline.stages` - above ``profiling``: teacher, profile, search,
  fine-tune and the ``run`` orchestration; :mod:`vitrim.pipeline.cli` is the command.

This namespace only re-exports the error types so the import stays cheap and
free of optional backends.
"""
from vitrim.pipeline.core.errors import InternalError, UserError, VitrimError

__all__ = ["VitrimError", "UserError", "InternalError"]
