"""vitrim: latency-aware structural compression of Vision Transformers.

The repository's top-level folders install under this namespace:

* ``vitrim.pipeline.core``   - config, data, the timm adapter, Plan, CompactViT, slicing, training loop
* ``vitrim.pipeline.search`` - the search strategies (algorithms on gates, costs and Plans; no files)
* ``vitrim.export``          - targets, runners, ONNX, engines, parity gate, manifest, the release step
* ``vitrim.profiling``       - latency lookup tables, their validation, curves
* ``vitrim.pipeline.stages`` - teacher, profile, search, fine-tune, run (the stages, on top of the rest)
* ``vitrim.pipeline.cli``    - the ``vitrim`` command

Imports point one way: core <- export <- profiling <- search <- stages.
"""
__version__ = "0.2.0"

__all__ = ["__version__"]
