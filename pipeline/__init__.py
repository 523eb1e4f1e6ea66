"""vitrim: latency-aware structural compression of Vision Transformers.

The ``pipeline`` package holds the core (config, data, the timm adapter, the
Plan, CompactViT, slicing) and, on top of ``export`` and ``profiling``, the
stages (search, fine-tune, run, CLI). Import stages from their modules; this
package namespace only re-exports the error types so ``import pipeline`` stays
cheap and free of optional backends.
"""
from pipeline.errors import VitrimError, UserError, InternalError

__all__ = ["VitrimError", "UserError", "InternalError"]
__version__ = "0.1.0"
