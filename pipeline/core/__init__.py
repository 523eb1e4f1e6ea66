"""Pipeline core (the bottom layer): config, data, the timm adapter (``models``,
the only timm-aware module), the Plan, CompactViT, slicing, the training loop,
evaluation, atomic I/O and the error types.

Imports nothing from ``vitrim.export``, ``vitrim.profiling`` or the stages.
"""
