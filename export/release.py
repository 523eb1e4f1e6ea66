"""The release step: a model (or an existing ONNX file) in, a verified engine and a manifest out.

``release`` chains ONNX export -> engine build -> the parity gate -> measured
latency -> ``manifest.json``. It knows nothing of the search or the LUT: a
predicted latency is just a number the caller may pass in. So it releases any
ONNX classifier, including one vitrim did not produce (``vitrim export --onnx``).

The parity reference is the torch model when one is given (on the best
available device, fp32, always a separate copy from the engine's model);
with an ONNX file alone it is ONNX Runtime on that file with every graph
optimization off. The data for the gate is a stream of ``(images, labels)``
batches, consumed once and never concatenated.

The release directory is self-contained: a given ONNX that lives elsewhere is
copied in (with its external-data files) before anything is hashed, so the
manifest lists only paths inside the directory and the directory can be moved.
``verdict.json`` records every gate, on a failure too (it is written before the
:class:`~vitrim.export.parity.ParityError` is raised).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ExportConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.rundir import RunDir


def model_io(model) -> tuple[tuple[int, ...], int]:
    """(per-sample input shape, token count) of a CompactViT or a timm ViT."""
    from vitrim.pipeline.core.models import input_channels

    plan = getattr(model, "plan", None)
    if plan is not None:
        return (plan.spec["in_chans"], *plan.spec["img_size"]), plan.num_tokens
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise UserError("export", f"cannot tell the input shape of a {type(model).__name__}",
                        "pass sample_shape=(C, H, W) to release()")
    in_chans = input_channels(model)
    return (in_chans, *pe.img_size), pe.num_patches + getattr(model, "num_prefix_tokens", 0)


def onnx_sample_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The static per-sample input shape of an ONNX model (dim 0 is the batch)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for corrupt files
        raise UserError("export", f"'{path}' is not a readable ONNX file ({type(e).__name__})",
                        "pass a valid .onnx file") from None
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError("export", f"'{path}' has {len(inputs)} inputs", "vitrim releases single-input image classifiers")
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value") and batch_dim.dim_value != 0:
        raise UserError("export", f"'{path}' has a static batch of {batch_dim.dim_value}",
                        "export it with a dynamic batch dim (torch.onnx.export(..., dynamic_shapes=...))")
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if not all(d.HasField("dim_value") for d in dims):
        raise UserError("export", f"'{path}' has symbolic non-batch input dims", "export with a static image size")
    return tuple(int(d.dim_value) for d in dims)


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Locations (relative to the graph's directory) of the files an ONNX keeps its tensors in, if any."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    def tensors(g):  # initializers and tensor attributes, subgraphs included
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from tensors(a.g)
                for sub in a.graphs:
                    yield from tensors(sub)

    m = onnx.load(str(path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in tensors(m.graph)
                   if t.data_location == onnx.TensorProto.EXTERNAL})


def bring_onnx_in(src: Path, rd: RunDir, log: Callable[[str], None] = print) -> Path:
    """A given ONNX outside the release directory, copied in so the release is relocatable.

    It keeps its name unless that is one vitrim writes itself (an engine, a quantized graph), then
    it becomes ``model.onnx``; its external-data files come along, at the same relative places.
    """
    from vitrim.pipeline.core.io import copy_into

    root = rd.root.resolve()
    if src.resolve().is_relative_to(root):
        return src
    from vitrim.export.backends import BACKENDS

    ours = {*(b.engine_path(rd).name for b in BACKENDS.values()),
            *(rd.engine_onnx(p).name for p in ("fp16", "bf16", "int8", "fp8"))}
    dst = rd.onnx if src.name in ours else rd.root / src.name
    for loc in external_data_files(src):
        if os.path.isabs(loc) or ".." in Path(loc).parts:
            raise UserError("export", f"'{src}' keeps tensors in '{loc}', outside its own directory",
                            "save the graph with its weights inside (onnx.save(..., save_as_external_data=False))")
        copy_into(src.parent / loc, rd.root / loc)
    copy_into(src, dst)
    log(f"[export] copied {src} into the release directory as {dst.name}")
    return dst


def save_torch_program(model, path: str | os.PathLike, sample_shape: tuple[int, ...]) -> Path:
    """Save ``model`` as a ``torch.export`` program (fp32, CPU, dynamic batch), atomically.

    Anyone loads it with plain ``torch.export.load(path).module()``, without vitrim: the program holds
    the graph and the weights, so none of vitrim's classes is needed to run the student.
    """
    import copy

    import torch

    from vitrim.export.onnx import _forward_arg_name
    from vitrim.pipeline.core.io import atomic_path

    m = copy.deepcopy(model).eval().cpu().float()
    dyn = {_forward_arg_name(m): {0: torch.export.Dim("batch", min=1, max=4096)}}
    with torch.no_grad():
        program = torch.export.export(m, (torch.randn(2, *sample_shape),), dynamic_shapes=dyn)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.export.save(program, f)
    return path


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def release(out_dir: str | os.PathLike, target: Target, data: Iterable[tuple], *, model=None,
            onnx_path: str | os.PathLike | None = None, export_cfg: Optional[ExportConfig] = None,
            sample_shape: Optional[tuple[int, ...]] = None, tokens: Optional[int] = None,
            predicted_ms: Optional[float] = None, warmup: int = 10, repeats: int = 60, name: str = "model",
            extra_artifacts: Optional[dict] = None, manifest_extra: Optional[dict] = None,
            config_hash: Optional[str] = None, calib_data: Optional[Iterable] = None,
            preprocessing=None, dataset: Optional[dict] = None,
            reference_model=None, log: Callable[[str], None] = print) -> dict:
    """Export (unless ``onnx_path`` is given), build the engine, gate on parity, time it, write the manifest.

    Args:
        data: ``(images, labels)`` batches (tensors or arrays) for the parity gate.
        model: the torch model: exported when ``onnx_path`` is None, and the parity reference.
        reference_model: the parity reference when it is not ``model``: after a quantization-aware
            recovery changed ``model``'s weights, the fp32 model the user validated, so the re-gated
            engine is held against what was validated rather than against the weights it was made from.
        onnx_path: an existing ONNX file to release instead of exporting ``model``.
        predicted_ms: a latency prediction to record beside the measurement.
        extra_artifacts: more files to hash into the manifest (name -> path).
        calib_data: image batches (real training images) for a static int8/fp8 calibration.
        preprocessing: the :class:`~vitrim.pipeline.core.preprocessing.Preprocessing` that ``data`` was
            made with, recorded in the manifest (what the engine expects as input).
        dataset: the model card's dataset entry (:func:`~vitrim.export.card.dataset_info`).

    Returns:
        ``{"parity", "latency", "manifest", "params", "onnx", "engine", "verdict"}``.

    Raises:
        ParityError: after writing ``parity.json`` and a failed ``verdict.json``, when the engine
            diverges (exit 3); no manifest then.
        ParityInconclusive: likewise, when nothing failed but the images cannot show the accuracy
            loss is within tolerance (exit 6); no manifest then either.
    """
    from vitrim.export.engine import build_engine
    from vitrim.export.manifest import write_manifest
    from vitrim.export.backends import BACKENDS
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.export.onnx import export_onnx
    from vitrim.export.parity import ParityError, ParityInconclusive, Tolerances, check_parity
    from vitrim.export.runners import TorchRunner
    from vitrim.export.verdict import parity_gates, parity_info, write_verdict
    from vitrim.pipeline.core.io import atomic_write_json, make_dir

    ecfg = export_cfg or ExportConfig()
    if model is None and onnx_path is None:
        raise UserError("export", "nothing to release", "pass a torch model or an ONNX file")
    backend = target.impl
    onnx_backends = " or ".join(n for n, b in BACKENDS.items() if not b.from_model)
    if model is None and backend.from_model:
        raise UserError("export", f"a {target.backend} target runs the torch model, and only an ONNX file was given",
                        f"pass the torch model, or use target.backend={onnx_backends}")
    if onnx_path is not None and backend.from_model:
        raise UserError("export", f"a {target.backend} target ships a torch program, not the given ONNX '{onnx_path}'",
                        f"drop --onnx, or use target.backend={onnx_backends} to release that file")
    out = make_dir(out_dir, "export")
    if onnx_path is not None:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError("export", f"ONNX file '{onnx_path}' not found", "pass the path of an existing .onnx file")
    if model is not None:
        model = model.eval().cpu()  # exported and referenced from the CPU copy; runners make their own
        m_shape, m_tokens = model_io(model)
        sample_shape, tokens = sample_shape or m_shape, tokens if tokens is not None else m_tokens
    if sample_shape is None:
        sample_shape = onnx_sample_shape(onnx_path)
    sig = target.signature(tokens or 0)  # fails fast on an unavailable target
    rd = RunDir(out)
    for stale in (rd.model_card, rd.compare):  # claims about the release this one replaces
        stale.unlink(missing_ok=True)
    for stale in (*rd.verdicts(), rd.verdict, rd.manifest_signature):
        stale.unlink(missing_ok=True)
    if model is None:  # no torch model this time: a program left by an earlier release is not this one's
        rd.torch_program.unlink(missing_ok=True)

    if onnx_path is None:
        onnx_path = export_onnx(model, rd.onnx, sample_shape, opset=ecfg.opset, simplify=ecfg.simplify)
        log(f"[export] {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)")
    else:
        log(f"[export] releasing the given ONNX {onnx_path}")
        if model is not None and tuple(onnx_sample_shape(onnx_path)) != tuple(sample_shape):
            raise UserError("export", f"'{onnx_path}' takes {onnx_sample_shape(onnx_path)} per image but the model "
                            f"takes {tuple(sample_shape)}", "pass the ONNX exported from this model")
        onnx_path = bring_onnx_in(onnx_path, rd, log)
    src = backend.graph_source(onnx_path, rd, target)
    qinfo = None
    if target.quantized:
        from vitrim.export.quantize import collect_calibration, quantize_for_target

        calib = None
        if target.quant.mode == "static":
            if calib_data is None:
                raise UserError("export", f"a static {target.precision} engine needs calibration images",
                                "pass calib_data (training images), or set target.quant.mode=dynamic")
            calib = collect_calibration(calib_data, target.quant.calib_images)
        src = backend.quantized_path(rd, target.precision)
        qinfo = quantize_for_target(onnx_path, src, target, calib)
        log(f"[export] quantized {target.precision} ({target.quant_key()}"
            + (f", {qinfo['calib_images']} calibration images" if calib is not None else "") + f"): {src}")
    engine = build_engine(src, out, target, sample_shape, model=model)
    log(f"[export] engine: {engine.backend} {engine.path or '(eager torch)'}")

    tol = Tolerances.for_precision(ecfg, backend.tolerance_precision(target.precision))
    if model is not None:
        ref_device = best_device()
        ref_model = model if reference_model is None else reference_model.eval().cpu()
        reference = TorchRunner(ref_model, sample_shape, ref_device, threads=target.threads)
        ref_desc = f"torch fp32 on {ref_device}" + ("" if reference_model is None else
                                                     " (the fp32 model before recovery)")
    else:
        reference = OrtCpuRunner(onnx_path, target.threads, "disable")  # the reference, whatever the target
        ref_desc = "the ONNX on ONNX Runtime, graph optimizations off"
    eng_runner = engine.runner(target, model, sample_shape)
    # a reduced precision's report also shows it against the fp32 engine (where the backend offers one)
    second = backend.second_reference(onnx_path, target) if target.precision != "fp32" else None
    import contextlib

    with reference, eng_runner, (second or contextlib.nullcontext()):
        report = check_parity(reference, eng_runner, data, tol, target.precision, ecfg.parity_worst,
                              max_images=ecfg.parity_images, second=second, second_name="fp32 engine")
    rep = report.to_dict()
    rep["onnx"] = onnx_path.resolve().relative_to(out.resolve()).as_posix()  # relocatable: inside the release
    rep["reference"] = ref_desc
    atomic_write_json(rd.parity, rep)
    gates = parity_gates(rep)
    v_info = {"release": name, "target": f"{target.backend}/{target.precision}", **parity_info(rep)}
    if not report.passed:
        failed = report.outcome != "inconclusive"
        msg = (f"[export] parity gate {'FAILED' if failed else 'INCONCLUSIVE'} for {name} on "
               f"{target.backend}/{target.precision}:\n  " + "\n  ".join(report.failures or report.undecided)
               + f"\n  details: {rd.parity}, {rd.verdict}; no manifest written")
        write_verdict(rd.verdict, gates, "export", error=msg, info=v_info)  # the evidence stays on disk
        raise (ParityError if failed else ParityInconclusive)(msg, rep)
    o = next(iter(report.outputs.values()))
    log(f"[export] parity passed against {ref_desc} over {report.images} images: top-1 agreement "
        f"{100 * report.top1_agreement:.2f}%, max |diff| {o['max_absdiff']:.2e}, relative L2 error worst image "
        f"{o['max_rel_l2']:.2e} (<= {tol.max_rel_l2:g}) / mean {o['mean_rel_l2']:.2e} (<= {tol.max_mean_rel_l2:g}), "
        f"probability divergence p{100 * tol.quantile:g} {o['q_prob_js']:.2e} (<= {tol.max_prob_js:g}), top-1 "
        f"reference {report.torch_top1:.2f}% / engine {report.engine_top1:.2f}% "
        f"(loss {report.accuracy['loss_pt']:+.2f} pt, {100 * tol.confidence:g}% interval "
        f"[{report.accuracy['ci_pt'][0]:+.2f}, {report.accuracy['ci_pt'][1]:+.2f}] <= {tol.max_acc_loss:g})")
    if report.vs_second:
        v = report.vs_second
        log(f"[export] {target.precision} engine vs the fp32 engine: top-1 agreement {100 * v['top1_agreement']:.2f}%, "
            f"top-1 {v['reference_top1']:.2f}% -> {v['engine_top1']:.2f}%, max |diff| {v['max_absdiff']:.3g}")

    # latency with the same runner code as the LUT
    timer = backend.timing_runner(src, engine, target, model, sample_shape)
    with timer:
        t = timer.time(target.batch, warmup=warmup, repeats=max(30, repeats))
    latency = {"batch": target.batch, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "repeats": t.repeats,
               "predicted_ms": predicted_ms, "images_per_s": 1000.0 * target.batch / t.median_ms}
    log(f"[export] latency at batch {target.batch}: median {t.median_ms:.3f} ms, p90 {t.p90_ms:.3f} ms"
        + (f" (predicted {predicted_ms:.3f} ms)" if predicted_ms is not None else ""))

    artifacts = {"onnx": onnx_path, "parity": rd.parity}
    for i, loc in enumerate(external_data_files(onnx_path)):  # the graph's weights, when kept beside it
        artifacts[f"onnx_data_{i}"] = onnx_path.parent / loc
    artifacts.update(engine.artifacts())
    if src != onnx_path:
        artifacts.update(backend.quantized_artifacts(src, target.precision) if target.quantized
                         else {f"onnx_{target.precision}": src})
    if model is not None:  # every release loads without vitrim too (torch targets: their engine is that program)
        if engine.path is None or Path(engine.path).resolve() != rd.torch_program.resolve():
            artifacts["torch_program"] = save_torch_program(model, rd.torch_program, sample_shape)
            log(f"[export] torch.export program {rd.torch_program}")
    artifacts.update(extra_artifacts or {})
    n_params = sum(p.numel() for p in model.parameters()) if model is not None else None
    info = {"model": {"name": name, "params": n_params}, "engine_options": engine.options}
    if qinfo is not None:
        info["quantization"] = qinfo  # settings and the calibration images' sha256
    for k, v in (manifest_extra or {}).items():
        info[k] = {**info.get(k, {}), **v} if isinstance(v, dict) and isinstance(info.get(k), dict) else v
    manifest = write_manifest(out, artifacts, parity=rep, signature=sig.to_dict(),
                              accuracy={"images": report.images, "reference": ref_desc,
                                        "torch_top1": report.torch_top1, "engine_top1": report.engine_top1},
                              latency=latency, config_hash=config_hash, extra=info,
                              preprocessing=preprocessing.to_dict() if preprocessing is not None else None)
    log(f"[export] manifest {manifest}")
    from vitrim.export.card import write_model_card

    log(f"[export] model card {write_model_card(out, dataset=dataset)}")
    write_verdict(rd.verdict, gates, "export", info=v_info)
    from vitrim.export.manifest import seal_manifest

    seal_manifest(out, log=log)  # the card and the verdict were written after the manifest: it lists every file
    return {"parity": rep, "latency": latency, "manifest": str(manifest), "params": n_params,
            "onnx": str(onnx_path), "engine": str(engine.path) if engine.path else None, "verdict": str(rd.verdict)}


def release_from_config(cfg, model, out_dir: str | os.PathLike, test_set, *, plan=None,
                        predicted_ms: Optional[float] = None, onnx_path=None, name: str = "model",
                        calib_set=None, manifest_extra: Optional[dict] = None,
                        reference_model=None,
                        weights: Optional[Path] = None, preprocessing=None,
                        log: Callable[[str], None] = print) -> dict:
    """:func:`release` driven by a :class:`~vitrim.pipeline.core.config.RunConfig` and a test dataset.

    ``weights`` names the student weights the release was made from when they are not
    ``out_dir/student.safetensors`` (after an int8 recovery). ``preprocessing`` is the one the
    test set was built with (``Splits.preprocessing``); without it, it is resolved from ``cfg``
    the same way.
    """
    from vitrim.pipeline.core.config import config_hash
    from vitrim.pipeline.core.data import make_loader
    from vitrim.pipeline.core.preprocessing import resolve_preprocessing

    out = Path(out_dir)
    rd = RunDir(out)
    extra = {key: path for key, path in (("student", rd.student), ("plan", rd.plan), ("lut", rd.lut),
                                         ("search_state", rd.search_dir.search_state)) if path.is_file()}
    if weights is not None:
        if "student" in extra and Path(weights).resolve() != rd.student.resolve():
            extra["finetuned_student"] = extra["student"]  # still in the directory: it is covered too
        extra["student"] = Path(weights)
    loader = make_loader(test_set, cfg.target.batch, workers=cfg.data.workers)
    calib = None
    if calib_set is not None and Target.from_config(cfg.target).quantized:  # training images, in a fixed order
        calib = make_loader(calib_set, 32, shuffle=True, seed=cfg.seed, workers=cfg.data.workers)
    from vitrim.export.card import dataset_info
    from vitrim.pipeline.core.config import save_resolved

    prep = preprocessing or resolve_preprocessing(cfg.data, cfg.model)
    save_resolved(cfg, out, prep)  # the release says how it was made; `vitrim compare` takes its test data from it
    return release(out, Target.from_config(cfg.target), loader, model=model, onnx_path=onnx_path,
                   export_cfg=cfg.export, predicted_ms=predicted_ms, warmup=cfg.profile.warmup,
                   repeats=cfg.profile.repeats, name=name, extra_artifacts=extra,
                   manifest_extra={"model": {"macs": plan.macs() if plan is not None else None},
                                   **(manifest_extra or {})},
                   config_hash=config_hash(cfg), calib_data=calib,
                   preprocessing=prep, dataset=dataset_info(cfg.data), reference_model=reference_model, log=log)
