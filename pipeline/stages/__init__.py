"""Pipeline stages (the top layer), one module per subcommand, each writing into a
:class:`~vitrim.pipeline.core.rundir.RunDir`:

* ``teacher``  - ``train-teacher``: train or load the teacher (and check it against ``model.expected_top1``)
* ``profile``  - ``profile``: build or reuse the latency table for the target
* ``search``   - ``search``: run the configured strategy (:mod:`vitrim.pipeline.search`); the closed loop
* ``slice``    - ``slice``: cut the teacher down to a plan
* ``finetune`` - ``finetune``: KD fine-tune of the sliced student
* ``release``  - ``export``: export, engine, parity gate, manifest (:mod:`vitrim.export.release`)
* ``qat``      - int8 recovery when an int8 engine fails the gate
* ``compare``  - ``compare``: the regression gate against a baseline release; ``run``'s model card, Triton
  repository and ``export.baseline`` gate (:mod:`vitrim.export.compare`, ``card``, ``triton``)
* ``run``      - ``run`` and ``curve``: every stage from one config

Reports and plots are :mod:`vitrim.pipeline.report`; the CLI is :mod:`vitrim.pipeline.cli`.
"""
