"""MODEL_CARD.md: a release described for the people who serve it, in the Hugging Face model-card format.

The card is derived from ``manifest.json`` (written after the parity gate passed) and cites
the manifest's sha256, so every figure in it is one the manifest holds: the YAML front matter
carries ``model-index`` results (dataset, engine top-1, measured latency and, from ``vitrim run``,
the speedup over the teacher, each with the device signature it was measured for); the body
gives the plan, the gate figures, how to feed the engine (the resolved preprocessing as a
runnable onnxruntime snippet) and the limits of the figures.

The card is not one of the manifest's artifacts (it is written from the manifest, after it);
the manifest's hash in the card ties the two together.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from vitrim.export.backends import BACKENDS
from vitrim.pipeline.core.rundir import RunDir


class _Dumper(yaml.SafeDumper):
    """Plain YAML: the signature appears twice, written out both times (no ``&id001`` anchors)."""

    def ignore_aliases(self, data) -> bool:
        return True


def dataset_info(data_cfg) -> dict:
    """The card's dataset entry for a :class:`~vitrim.pipeline.core.config.DataConfig` (its test split)."""
    if data_cfg.name == "fmnist":
        d = {"name": "Fashion-MNIST", "type": "fashion_mnist", "split": "test"}
    else:
        root = Path(data_cfg.root or ".")
        d = {"name": root.name or str(root), "type": "imagefolder", "split": "test"}
    if data_cfg.test_limit is not None:
        d["args"] = {"test_limit": data_cfg.test_limit}
    return d


def _artifact(manifest: dict, root: Path, key: str) -> Optional[Path]:
    e = manifest.get("artifacts", {}).get(key)
    if e is None:
        return None
    p = Path(e["path"])
    return p if p.is_absolute() else root / p


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def onnx_io(path: str | os.PathLike) -> tuple[str, str]:
    """(input name, output name) of an ONNX graph: what ``session.run`` is fed and returns."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits), g.output[0].name


def preprocess_code(p: dict) -> list[str]:
    """Python lines of ``preprocess(path) -> NCHW float32 batch of 1`` for a recorded preprocessing.

    Plain PIL + numpy for the layouts timm's eval transform builds from torchvision parts (no
    resize; shorter side then centre crop; squash then centre crop); timm itself for the rest.
    """
    C, H, W = p["input_size"]
    mean = ", ".join(f"{v:.6g}" for v in p["mean"])
    std = ", ".join(f"{v:.6g}" for v in p["std"])
    interp = (p.get("interpolation") or "bilinear").upper()
    lines = [f"MEAN = np.array([{mean}], dtype=np.float32)", f"STD = np.array([{std}], dtype=np.float32)", "", "",
             "def preprocess(path):",
             f'    """{"; ".join(p.get("steps") or [])}."""',
             f'    img = Image.open(path).convert("{p["channels"]}")']
    resize, mode = p.get("resize"), p.get("crop_mode")
    if resize is None:
        lines.append(f"    assert img.size == ({W}, {H}), f'expected a {W}x{H} image, got {{img.size}}'")
    elif mode in ("center", "squash") and (mode == "squash" or resize[0] == resize[1]):
        if mode == "squash":
            lines.append(f"    img = img.resize(({resize[1]}, {resize[0]}), Image.Resampling.{interp})")
        else:  # torchvision's Resize(int): the shorter side to that size, the longer one scaled and truncated
            lines += ["    w, h = img.size",
                      f"    s = {resize[0]}",
                      "    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)",
                      f"    img = img.resize(size, Image.Resampling.{interp})"]
        lines += ["    w, h = img.size  # centre crop as torchvision rounds it",
                  f"    left, top = int(round((w - {W}) / 2.0)), int(round((h - {H}) / 2.0))",
                  f"    img = img.crop((left, top, left + {W}, top + {H}))"]
    else:  # border mode, or a non-square centre crop: timm's own transform (pip install timm)
        lines = [lines[0], lines[1], "", "", "def preprocess(path):",
                 f'    """{"; ".join(p.get("steps") or [])}."""',
                 "    import timm.data",
                 f"    t = timm.data.create_transform(input_size=({C}, {H}, {W}), interpolation={p.get('interpolation')!r}, "
                 f"mean=tuple(MEAN), std=tuple(STD), crop_pct={p.get('crop_pct')!r}, crop_mode={mode!r})",
                 f'    return t(Image.open(path).convert("{p["channels"]}")).numpy()[None]']
        return lines
    lo, hi = p.get("value_range", [0.0, 1.0])
    scale = "/ 255.0" if (lo, hi) == (0.0, 1.0) else f"* ({hi} - {lo}) / 255.0 + {lo}"
    lines += [f"    x = np.asarray(img, dtype=np.float32) {scale}",
              "    x = x[:, :, None] if x.ndim == 2 else x  # HWC",
              "    x = (x - MEAN) / STD",
              "    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # NCHW, a batch of one"]
    return lines


def run_snippet(manifest: dict, root: Path) -> Optional[str]:
    """A runnable onnxruntime example: preprocess one image as the engine expects, run the released graph."""
    p = manifest.get("preprocessing")
    sig = manifest.get("device_signature") or {}
    graph = _artifact(manifest, root, "onnx")
    backend = BACKENDS.get(sig.get("backend"))
    if backend is not None and backend.engine_is_graph:  # the quantized graph is the engine's; others run fp32
        graph = _artifact(manifest, root, f"onnx_{sig.get('precision')}") or graph
    if not p or graph is None or not graph.is_file():
        return None
    inp, _ = onnx_io(graph)
    threads = sig.get("threads") or 1
    level = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}.get(
        sig.get("opt_level"), "ORT_ENABLE_ALL")
    lines = ["import sys", "", "import numpy as np", "import onnxruntime as ort", "from PIL import Image", "",
             *preprocess_code(p), "", "",
             "so = ort.SessionOptions()",
             f"so.intra_op_num_threads = {threads}  # as measured",
             f"so.graph_optimization_level = ort.GraphOptimizationLevel.{level}",
             f'sess = ort.InferenceSession("{_rel(graph, root)}", so, providers=["CPUExecutionProvider"])',
             f'logits = sess.run(None, {{"{inp}": preprocess(sys.argv[1])}})[0]',
             'print("class", int(logits.argmax(1)[0]), "logits", logits[0].tolist())']
    return "\n".join(lines)


def torch_snippet(manifest: dict, root: Path) -> Optional[str]:
    """A runnable example with torch alone: the released ``torch.export`` program, no vitrim import."""
    p = manifest.get("preprocessing")
    prog = _artifact(manifest, root, "torch_program")
    sig = manifest.get("device_signature") or {}
    backend = BACKENDS.get(sig.get("backend"))
    if prog is None and backend is not None and backend.from_model:  # a torch target: its engine is the program
        prog = _artifact(manifest, root, "engine")
    if not p or prog is None or not prog.is_file():
        return None
    return "\n".join(["import sys", "", "import numpy as np", "import torch", "from PIL import Image", "",
                      *preprocess_code(p), "", "",
                      f'model = torch.export.load("{_rel(prog, root)}").module()',
                      "with torch.no_grad():",
                      "    logits = model(torch.from_numpy(preprocess(sys.argv[1])))",
                      'print("class", int(logits.argmax(1)[0]), "logits", logits[0].tolist())'])


def _gate_rows(parity: dict) -> list[str]:
    """The parity gate's entries (:func:`~vitrim.export.verdict.parity_gates`: one source for verdict and card)."""
    from vitrim.export.verdict import parity_gates

    rows = ["| gate | measured | threshold | |", "|---|---:|---:|---|"]
    if not parity.get("outputs"):
        return rows
    for g in parity_gates(parity):
        what = g["check"] + (f" (output `{g['output']}`)" if g.get("output") else "")
        m = "not finite" if g["measured"] is None else f"{g['measured']:.3g}"
        if g.get("interval"):
            m += f" [{g['interval'][0]:+.2f}, {g['interval'][1]:+.2f}]"
        rows.append(f"| {what} | {m} | {g['op']} {g['threshold']:g} | {g['outcome'].upper()} |")
    return rows


def render_model_card(manifest: dict, root: Path, *, dataset: Optional[dict] = None,
                      speedup: Optional[dict] = None) -> str:
    """The card's text for a manifest (see :func:`write_model_card`)."""
    from vitrim.export.target import DeviceSignature

    sig = manifest.get("device_signature") or {}
    try:
        sig_str = str(DeviceSignature.from_dict(sig))
    except Exception:  # an older or partial signature: shown as recorded
        sig_str = str(sig)
    acc, lat, parity = manifest.get("accuracy") or {}, manifest.get("latency") or {}, manifest.get("parity") or {}
    model = manifest.get("model") or {}
    engine_sha = ((manifest.get("artifacts") or {}).get("engine") or (manifest.get("artifacts") or {}).get("onnx")
                  or {}).get("sha256")
    name = model.get("name") or root.name
    engine = f"{sig.get('backend')}/{sig.get('precision')}"
    ds = dataset or {"name": "unknown", "type": "unknown", "split": "test"}
    metrics = []
    if acc.get("engine_top1") is not None:
        metrics.append({"type": "accuracy", "name": "top-1 accuracy of the engine (%)", "value": acc["engine_top1"],
                        "args": {"images": acc.get("images"), "engine": engine}})
    if lat.get("median_ms") is not None:
        metrics.append({"type": "latency", "name": f"median latency at batch {lat.get('batch')} (ms)",
                        "value": lat["median_ms"],
                        "args": {"batch": lat.get("batch"), "p90_ms": lat.get("p90_ms"), "device_signature": sig}})
    if speedup:
        metrics.append({"type": "speedup", "name": "measured speedup over the teacher", "value": speedup["value"],
                        "args": {**{k: v for k, v in speedup.items() if k != "value"}, "device_signature": sig}})
    front = {
        "library_name": "onnx",
        "pipeline_tag": "image-classification",
        "tags": ["vitrim", "vision-transformer", "onnx", sig.get("backend"), sig.get("precision")],
        "datasets": [ds["type"]] if ds.get("type") not in (None, "unknown", "imagefolder") else [],
        "metrics": ["accuracy"],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": ds, "metrics": metrics}]}],
        "vitrim": {"manifest": RunDir(root).manifest.name, "engine_sha256": engine_sha, "device_signature": sig,
                   "preprocessing": manifest.get("preprocessing")},
    }
    if not front["datasets"]:
        front.pop("datasets")
    out = ["---", yaml.dump(front, Dumper=_Dumper, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
           f"A Vision Transformer released by vitrim as a `{engine}` engine, verified against its reference by the "
           f"parity gate and timed on the machine below. Every figure here comes from `{RunDir(root).manifest.name}` "
           f"(engine sha256 `{(engine_sha or '?')[:16]}...`), which also lists this card's sha256: `vitrim "
           "verify-manifest .` re-checks every file of the release.", "",
           "## Results", "", "| | |", "|---|---|"]
    if acc.get("engine_top1") is not None:
        out.append(f"| top-1, engine (%) | {acc['engine_top1']:.2f} on {acc.get('images')} {ds.get('name')} "
                   f"{ds.get('split', 'test')} images |")
    if acc.get("torch_top1") is not None:
        out.append(f"| top-1, reference (%) | {acc['torch_top1']:.2f} ({acc.get('reference')}) |")
    if lat.get("median_ms") is not None:
        out.append(f"| latency, median / p90 (ms) | {lat['median_ms']:.3f} / {lat.get('p90_ms', float('nan')):.3f} "
                   f"at batch {lat.get('batch')} |")
    if lat.get("predicted_ms") is not None:
        out.append(f"| latency predicted by the LUT (ms) | {lat['predicted_ms']:.3f} |")
    if speedup:
        out.append(f"| speedup over the teacher | {speedup['value']:.2f}x ({speedup.get('protocol', 'measured')}) |")
    if model.get("params") is not None:
        out.append(f"| parameters | {model['params'] / 1e6:.3f} M |")
    plan_path = _artifact(manifest, root, "plan")
    if plan_path is not None and plan_path.is_file():
        from vitrim.pipeline.core.plan import Plan

        out += ["", "## Plan", "", "The architecture kept from the teacher (per block: heads, QK and V dims per head, "
                "MLP width):", "", "```", Plan.load(plan_path).summary(), "```"]
    out += ["", "## Gates", "", f"The engine passed the parity gate against {acc.get('reference', 'its reference')} "
            f"on {parity.get('images')} images ({parity.get('precision')} tolerances):", "", *_gate_rows(parity)]
    p = manifest.get("preprocessing")
    out += ["", "## How to run it", ""]
    if p:
        out += ["The engine expects this input (resolved once, recorded in the manifest):", "",
                *[f"{i}. {s}" for i, s in enumerate(p.get("steps") or [], 1)], "",
                f"Input `{'x'.join(str(v) for v in p['input_size'])}` ({p.get('channels')}), mean "
                f"`{p.get('mean')}`, std `{p.get('std')}`, {p.get('layout')} {p.get('dtype')}."]
        snippet = run_snippet(manifest, root)
        if snippet:
            out += ["", "With onnxruntime (`python run.py image.png` in this directory):", "", "```python", snippet,
                    "```"]
        snippet = torch_snippet(manifest, root)
        if snippet:
            out += ["", "With torch alone, from the `torch.export` program (no vitrim needed):", "", "```python",
                    snippet, "```"]
    else:
        out.append("The release records no preprocessing (an ONNX released without a config): feed it what its "
                   "exporter documented.")
    eng = _artifact(manifest, root, "engine")
    backend = BACKENDS.get(sig.get("backend"))
    if eng is not None and not (backend is not None and backend.engine_is_graph):
        out += ["", f"The `{sig.get('backend')}` engine itself is `{_rel(eng, root)}`; the snippet runs the ONNX graph "
                "it was built from."]
    out += ["", "## Limits", "",
            f"- Latency was measured on one machine: {sig_str}. It holds for that device, engine version, thread "
            "count and batch; elsewhere, measure again (`vitrim compare` re-times two releases side by side).",
            f"- Accuracy is the engine's top-1 on {acc.get('images')} images of the {ds.get('name')} "
            f"{ds.get('split', 'test')} split, preprocessed as above; other data or other preprocessing give other "
            "figures.",
            "- The parity gate bounds the engine's deviation from the reference by the tolerances in the table "
            f"({parity.get('precision')}); int8 logits move by design, the decisions are what it holds.",
            "- The figures were measured by vitrim, not by an independent evaluation."]
    return "\n".join(out) + "\n"


def write_model_card(release_dir: str | os.PathLike, *, dataset: Optional[dict] = None,
                     speedup: Optional[dict] = None) -> Path:
    """Write ``MODEL_CARD.md`` into a release directory from its ``manifest.json``.

    Args:
        dataset: the model-index dataset entry (:func:`dataset_info`); unknown when None.
        speedup: ``{"value": x, "teacher_ms": ..., "protocol": ...}`` from ``vitrim run``'s side-by-side timing.
    """
    import json

    from vitrim.pipeline.core.io import atomic_write_text

    rd = RunDir(release_dir)
    manifest = json.loads(rd.manifest.read_text())
    text = render_model_card(manifest, rd.root, dataset=dataset,
                             speedup=speedup)
    atomic_write_text(rd.model_card, text)
    return rd.model_card
