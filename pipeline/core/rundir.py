"""RunDir: the one place that names a run's artifacts.

Every stage reads and writes through a :class:`RunDir`, so a file name such as
``plan.json`` is spelled once, here, and a stage that wants another stage's output
asks for it by attribute instead of re-deriving the name (STYLE.md 14). A release
directory is a RunDir too: ``vitrim export --out DIR`` writes the same names.

The layout of a ``vitrim run`` directory::

    resolved_config.yaml  stages.json          the config as run; which stages finished, with their keys
    lut.json  lut_validation.{json,png}        the latency table (a copy of the cached one) and its check
    plan.json  search_log.json  widths.png     the searched architecture, the search's steps, its plot
    search_state.safetensors                   the KD-adapted weights the search ended with
    measured_budget.json                       the closed loop's rounds (measured against the teacher)
    student.safetensors  checkpoint.pt         the fine-tuned student; the trainer's resumable state
    finetune_log.json
    model.onnx  model.<precision>.onnx         the exported graph; the quantized / fp16 graph built from it
    model.ort.onnx | model.ov.xml | model.plan | model.pt2    the engine (ORT-optimized graph, OpenVINO IR,
                                               TensorRT plan, torch.export)
    parity.json  manifest.json                 the parity gate's figures; the release manifest
    MODEL_CARD.md  compare.json                the model card; the regression gate against a baseline
    verdict.json  manifest.json.sig            every gate's figure, threshold, pass/fail and exit code; the
                                               manifest's detached Ed25519 signature (``vitrim sign``)
    summary.json  report.md  curve.{csv,png,md}  the run's summary, its report, the latency-accuracy curve
    points/<point>.json                        a curve point's outcome (``vitrim curve --point``)

``vitrim run`` gives some stages a directory of their own inside it, laid out
the same way: ``search/`` (the search's plan, log, plot, weights and closed
loop), ``finetune/`` (the trainer's checkpoint), ``teacher/`` (the teacher's
release, timed beside the student) and ``int8_recovery/``.
"""
from __future__ import annotations

import os
from pathlib import Path


class RunDir:
    """The artifact paths of one run (or release) directory. Creates nothing by itself."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def mkdir(self) -> "RunDir":
        from vitrim.pipeline.core.io import make_dir

        make_dir(self.root)  # an I/O fault exits 2 naming the directory
        return self

    # configuration and bookkeeping
    @property
    def resolved_config(self) -> Path:
        return self.root / "resolved_config.yaml"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    # profile
    @property
    def lut(self) -> Path:
        return self.root / "lut.json"

    @property
    def lut_validation(self) -> Path:
        return self.root / "lut_validation.json"

    @property
    def lut_validation_plot(self) -> Path:
        return self.root / "lut_validation.png"

    # search
    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def search_log(self) -> Path:
        return self.root / "search_log.json"

    @property
    def search_state(self) -> Path:
        return self.root / "search_state.safetensors"

    @property
    def widths_plot(self) -> Path:
        return self.root / "widths.png"

    @property
    def measured_budget(self) -> Path:
        return self.root / "measured_budget.json"

    # fine-tune
    @property
    def student(self) -> Path:
        return self.root / "student.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def finetune_log(self) -> Path:
        return self.root / "finetune_log.json"

    # export
    @property
    def onnx(self) -> Path:
        """The fp32 graph exported from the torch model."""
        return self.root / "model.onnx"

    def engine_onnx(self, precision: str) -> Path:
        """The graph the engine is built from: ``model.onnx`` for fp32, else ``model.<precision>.onnx``."""
        return self.onnx if precision == "fp32" else self.root / f"model.{precision}.onnx"

    @property
    def ort_engine(self) -> Path:
        return self.root / "model.ort.onnx"

    @property
    def trt_engine(self) -> Path:
        return self.root / "model.plan"

    @property
    def trt_timing_cache(self) -> Path:
        return self.root / "timing.cache"

    @property
    def ov_engine(self) -> Path:
        """OpenVINO's engine: an IR (``.xml`` graph; its weights in :attr:`ov_engine_weights`)."""
        return self.root / "model.ov.xml"

    @property
    def ov_engine_weights(self) -> Path:
        return self.ov_engine.with_suffix(".bin")

    def ov_graph(self, precision: str) -> Path:
        """An OpenVINO IR the engine is built from (NNCF's int8 graph): ``model.<precision>.xml`` and ``.bin``."""
        return self.root / f"model.{precision}.xml"

    @property
    def torch_program(self) -> Path:
        return self.root / "model.pt2"

    @property
    def parity(self) -> Path:
        return self.root / "parity.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def manifest_signature(self) -> Path:
        """The detached Ed25519 signature of ``manifest.json`` (``vitrim sign``)."""
        return self.root / "manifest.json.sig"

    @property
    def verdict(self) -> Path:
        """Every gate's figure, threshold, pass/fail and the exit code (written on failure too)."""
        return self.root / "verdict.json"

    # release workflow (issue 24)
    @property
    def model_card(self) -> Path:
        """The Hugging Face-style model card of a release (``export/card.py``)."""
        return self.root / "MODEL_CARD.md"

    @property
    def compare(self) -> Path:
        """The regression gate's figures against a baseline release (``export/compare.py``)."""
        return self.root / "compare.json"

    # reports
    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def curve_csv(self) -> Path:
        return self.root / "curve.csv"

    @property
    def curve_plot(self) -> Path:
        return self.root / "curve.png"

    @property
    def curve_report(self) -> Path:
        """The curve's markdown report: the timing session, each point over its seeds, which differences between
        methods exceed the spread between seeds."""
        return self.root / "curve.md"

    def curve_outcome(self, point: str) -> Path:
        """The record of one finished curve point (done, or its budget unreachable), named by its run directory;
        kept in ``points/`` of the curve's directory, outside the point's release (its manifest lists every file)."""
        return self.root / "points" / f"{point}.json"

    # a `vitrim run` directory's own sub-directories (each a RunDir)
    @property
    def search_dir(self) -> "RunDir":
        """The search stage's outputs: plan, search log, widths plot, adapted weights, closed loop."""
        return RunDir(self.root / "search")

    @property
    def finetune_dir(self) -> "RunDir":
        """The fine-tune's resumable trainer state (its ``checkpoint``)."""
        return RunDir(self.root / "finetune")

    @property
    def teacher_dir(self) -> "RunDir":
        """The teacher's release, measured and reported beside the student's."""
        return RunDir(self.root / "teacher")

    @property
    def int8_recovery_dir(self) -> "RunDir":
        """The int8-recovery pass: its trainer state and the recovered student."""
        return RunDir(self.root / "int8_recovery")

    def curve_run(self, method: str, budget: float, seed: int = 0, tag: str = "") -> "RunDir":
        """The run directory of one point of ``vitrim curve``: a strategy at a budget, with the ``seed``-th seed
        (none for the first), ``tag`` naming what a progressive point started from."""
        return RunDir(self.root / f"{method}_{budget:g}{f'_s{seed}' if seed else ''}{tag}")

    def release_claims(self) -> tuple[Path, ...]:
        """The files that make this directory look like a release (and the nested teacher's): an I/O fault
        in a release removes them with what it wrote."""
        return (self.manifest, self.manifest_signature, self.verdict, self.model_card,
                self.teacher_dir.manifest, self.teacher_dir.verdict, self.teacher_dir.model_card)

    def resumable(self) -> tuple[Path, ...]:
        """What a rerun of ``vitrim run`` resumes from (kept when its release stops on an I/O fault)."""
        return (self.stages, self.resolved_config, self.lut, self.search_dir.root, self.finetune_dir.root,
                self.int8_recovery_dir.root, self.student, self.plan, self.finetune_log, self.checkpoint)

    def verdicts(self) -> tuple[Path, ...]:
        """Files that state a verdict; removed before a stage that re-decides them runs."""
        return (self.manifest, self.parity)
