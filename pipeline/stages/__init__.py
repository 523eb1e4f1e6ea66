"""Pipeline stages (the top layer), one module per stage:

* ``teacher``  - train or load the teacher
* ``profile``  - build or reuse the latency table for the target
* ``search``   - latency-aware structural search (``saliency``: the gate scores)
* ``finetune`` - KD fine-tune of the sliced student (``distill``: the loss)
* ``run``      - every stage from one config, the curve sweep

Slicing math is core (:mod:`vitrim.pipeline.core.slicing`); export and release
are :mod:`vitrim.export.release`.
"""
