"""Pipeline core (the bottom layer): config, data, the timm adapter (``models``:
the one module that knows timm's ViT module names; ``hf`` maps Hugging Face
ViT/DeiT checkpoints onto them; ``data`` and ``preprocessing`` use timm's image
transforms), the Plan, CompactViT, slicing, the training loop, evaluation,
atomic I/O and the error types.

Imports nothing from ``vitrim.export``, ``vitrim.profiling`` or the stages.
"""
