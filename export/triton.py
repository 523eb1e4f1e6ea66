"""A Triton Inference Server model repository from a release directory.

``write_triton_repo(RELEASE, DIR)`` lays out::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx     (ORT-CPU releases: platform onnxruntime_onnx)
    DIR/<name>/1/model.xml, model.bin  (OpenVINO releases: backend openvino)
    DIR/<name>/1/model.plan     (TensorRT releases: platform tensorrt_plan)

Everything in ``config.pbtxt`` is read from the release, never typed in: input and output
names, data types and dims from the ONNX graph the engine was built from (the batch dim
dropped when it is dynamic); ``max_batch_size`` from the engine's batch profile (a TensorRT
plan's profile max; a dynamic-batch ONNX takes ``export.triton_max_batch``, else
``target.max_batch``, else the batch the release was timed at); dynamic batching whenever
the engine takes more than one image, preferring that timed batch; and, for ONNX Runtime, the
session options the release was measured with (intra-op threads, sequential execution, the
graph optimization level) as the ORT backend's parameters; for OpenVINO, its threads, streams,
performance hint and inference precision. Each backend's fields come from its module in
:mod:`vitrim.export.backends`.

The file is written with protobuf's ``text_format`` from tritonclient's own ``ModelConfig``
message when ``tritonclient[grpc]`` is installed (the ``triton`` extra), which also rejects any
field Triton does not know; without it, a small writer emits the same text.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

from vitrim.export.backends import BACKENDS
from vitrim.pipeline.core.errors import UserError, install_hint
from vitrim.pipeline.core.rundir import RunDir



class TritonRepo:
    """The paths of a Triton model repository (Triton's layout: one folder a model, one sub-folder a version)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def config(self, name: str) -> Path:
        return self.model_dir(name) / "config.pbtxt"

    def version_dir(self, name: str, version: int = 1) -> Path:
        return self.model_dir(name) / str(version)

    def model_file(self, name: str, filename: str, version: int = 1) -> Path:
        return self.version_dir(name, version) / filename


class Enum(str):
    """A protobuf enum value (``TYPE_FP32``): bare in text format, a string in the dict form."""


class Map(dict):
    """A protobuf map field (``parameters``): ``{key: message}``."""


def triton_dtype(elem_type: int) -> str:
    """Triton's ``DataType`` name of an ONNX tensor element type."""
    import onnx

    t = onnx.TensorProto
    table = {t.FLOAT: "TYPE_FP32", t.FLOAT16: "TYPE_FP16", t.BFLOAT16: "TYPE_BF16", t.DOUBLE: "TYPE_FP64",
             t.INT8: "TYPE_INT8", t.INT16: "TYPE_INT16", t.INT32: "TYPE_INT32", t.INT64: "TYPE_INT64",
             t.UINT8: "TYPE_UINT8", t.UINT16: "TYPE_UINT16", t.UINT32: "TYPE_UINT32", t.UINT64: "TYPE_UINT64",
             t.BOOL: "TYPE_BOOL", t.STRING: "TYPE_STRING"}
    if elem_type not in table:
        raise UserError("triton", f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} has no Triton type",
                        "export the model with float32 inputs and outputs")
    return table[elem_type]


def graph_io(onnx_path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX graph: ``{"name", "elem_type", "shape"}``, a symbolic dim as None."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def one(v) -> dict:
        shape = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "elem_type": v.type.tensor_type.elem_type, "shape": shape}

    return [one(v) for v in g.input if v.name not in inits], [one(v) for v in g.output]


def _dims(shape: list, batched: bool, where: str) -> list[int]:
    dims = shape[1:] if batched else shape
    if any(d is None for d in dims):
        raise UserError("triton", f"{where} has symbolic dims beyond the batch: {shape}",
                        "export with a static image size (vitrim's exporter does)")
    return [int(d) for d in dims]


def triton_backend(sig: dict):
    """The release's backend, when Triton serves it, else a UserError naming those it serves."""
    backend = BACKENDS.get(sig.get("backend"))
    if backend is None or backend.triton is None:
        served = " or ".join(f"{n} ({b.triton.value})" for n, b in BACKENDS.items() if b.triton is not None)
        raise UserError("triton", f"a {sig.get('backend')} release ships a torch program, which no Triton platform "
                        "loads as is", f"release for target.backend={served}")
    return backend


def model_config(manifest: dict, graph: Path, name: str, max_batch: Optional[int] = None) -> dict:
    """``ModelConfig`` as a dict (protobuf's JSON form with :class:`Enum` / :class:`Map` marks).

    Args:
        manifest: the release's manifest (device signature, preprocessing, engine options).
        graph: the ONNX graph the engine was built from (its inputs and outputs).
        max_batch: the largest batch Triton may form (dynamic-batch ONNX); see the module docstring.
    """
    sig = manifest.get("device_signature") or {}
    backend = triton_backend(sig)
    spec = backend.triton
    inputs, outputs = graph_io(graph)
    if len(inputs) != 1:
        raise UserError("triton", f"'{graph}' has {len(inputs)} inputs", "vitrim releases single-input classifiers")
    dynamic = inputs[0]["shape"][:1] == [None] or inputs[0]["shape"][:1] == [0]
    timed = int(sig.get("batch") or 1)
    mb = backend.triton_max_batch(sig, max_batch, dynamic)
    prep = manifest.get("preprocessing") or {}
    cfg: dict = {"name": name, spec.key: spec.value, "max_batch_size": mb}
    cfg["input"] = []
    for v in inputs:
        d = _dims(v["shape"], mb > 0, f"input '{v['name']}'")
        entry = {"name": v["name"], "data_type": Enum(triton_dtype(v["elem_type"])), "dims": d}
        if prep.get("layout") in ("NCHW", "NHWC") and len(d) == 3:
            entry["format"] = Enum(f"FORMAT_{prep['layout']}")  # an image input, as the clients' image tools expect
        cfg["input"].append(entry)
    cfg["output"] = [{"name": v["name"], "data_type": Enum(triton_dtype(v["elem_type"])),
                      "dims": _dims(v["shape"], mb > 0, f"output '{v['name']}'")} for v in outputs]
    cfg["instance_group"] = [{"count": 1, "kind": Enum(spec.kind)}]
    if mb > 1:
        cfg["dynamic_batching"] = {"preferred_batch_size": [timed]} if timed <= mb else {}
    fields = backend.triton_fields(sig)  # run as measured: the options the latency was timed with
    if "parameters" in fields:
        fields["parameters"] = Map({k: {"string_value": v} for k, v in fields["parameters"].items()})
    cfg.update(fields)
    return cfg


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return str(v) if isinstance(v, Enum) else v


def _text(cfg: dict, indent: int = 0) -> list[str]:
    """The protobuf text format of a config dict, without protobuf (scalars, enums, messages, repeated, maps)."""
    pad, out = "  " * indent, []

    def scalar(v) -> str:
        if isinstance(v, Enum):
            return str(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    for k, v in cfg.items():
        if isinstance(v, Map):
            for mk, mv in v.items():
                out += [f"{pad}{k} {{", f'{pad}  key: {scalar(mk)}', f"{pad}  value {{", *_text(mv, indent + 2),
                        f"{pad}  }}", f"{pad}}}"]
        elif isinstance(v, dict):
            out += [f"{pad}{k} {{", *_text(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, list):
            for x in v:
                out += [f"{pad}{k} {{", *_text(x, indent + 1), f"{pad}}}"] if isinstance(x, dict) \
                    else [f"{pad}{k}: {scalar(x)}"]
        else:
            out.append(f"{pad}{k}: {scalar(v)}")
    return out


def to_pbtxt(cfg: dict, use_protobuf: Optional[bool] = None) -> str:
    """``config.pbtxt`` text: through tritonclient's ``ModelConfig`` when importable, else the small writer."""
    if use_protobuf is not False:
        try:
            from google.protobuf import json_format, text_format
            from tritonclient.grpc import model_config_pb2
        except ImportError:
            if use_protobuf:
                raise UserError("triton", "tritonclient is not installed", install_hint("triton")) from None
        else:  # ParseDict refuses a field or enum value that Triton's schema lacks
            msg = json_format.ParseDict(_plain(cfg), model_config_pb2.ModelConfig())
            return text_format.MessageToString(msg)
    return "\n".join(_text(cfg)) + "\n"


def sanitize_name(name: str) -> str:
    """A Triton model name (a folder name): letters, digits, ``_``, ``-`` and ``.``."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return s or "model"


def write_triton_repo(release_dir: str | os.PathLike, repo_dir: str | os.PathLike, name: str, *,
                      max_batch: Optional[int] = None, log: Callable[[str], None] = print) -> Path:
    """Lay out ``repo_dir/<name>/`` for a verified release; returns the written ``config.pbtxt``.

    The release's manifest is verified first (a tampered engine is not served).
    """
    from vitrim.export.manifest import verify_manifest
    from vitrim.pipeline.core.io import atomic_write_text, copy_into

    release = RunDir(release_dir)
    manifest = verify_manifest(release.root)
    name = sanitize_name(name)

    def artifact(key: str) -> Optional[Path]:
        e = manifest["artifacts"].get(key)
        if e is None:
            return None
        p = Path(e["path"])
        return p if p.is_absolute() else release.root / p

    sig = manifest.get("device_signature") or {}
    precision = sig.get("precision")
    graph = artifact(f"onnx_{precision}") or artifact("onnx")  # the graph the engine was built from
    if graph is None:
        raise UserError("triton", f"the release '{release.root}' lists no ONNX graph", "re-export it")
    cfg = model_config(manifest, graph, name, max_batch)
    spec = triton_backend(sig).triton
    # ORT serves the engine's graph (Triton's backend optimizes it with the options above); OpenVINO its IR and
    # weights; TensorRT the plan
    served = [graph] if spec.served == "graph" else [artifact("engine"), artifact("engine_weights")]
    repo = TritonRepo(repo_dir)
    filename = spec.files[0]
    dst = repo.model_file(name, filename)
    if served[0].suffix == ".onnx":  # a graph whose weights live in external-data files: they travel beside it
        from vitrim.export.release import external_data_files

        for loc in external_data_files(served[0]):
            if os.path.isabs(loc) or ".." in Path(loc).parts:
                raise UserError("triton", f"'{served[0]}' keeps tensors in '{loc}', outside its own directory",
                                "re-export the release with its weights inside its directory")
            copy_into(served[0].parent / loc, dst.parent / loc)
    for src, name_in_repo in zip(served, spec.files):  # the model file, and an IR's weights beside it
        copy_into(src, repo.model_file(name, name_in_repo))
    served = served[0]
    path = repo.config(name)
    atomic_write_text(path, to_pbtxt(cfg))
    log(f"[triton] {repo.model_dir(name)}: {spec.value}, max_batch_size {cfg['max_batch_size']}, "
        f"{served.name} -> {repo.model_file(name, filename)}")
    return path


def triton_from_config(cfg, release_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Optional[Path]:
    """``export.triton``: the Triton repository of a release made with ``cfg`` (None when the key is unset)."""
    e = cfg.export
    if not e.triton:
        return None
    max_batch = e.triton_max_batch or cfg.target.max_batch
    return write_triton_repo(release_dir, e.triton, e.triton_name or cfg.name, max_batch=max_batch, log=log)
