"""The Triton model repository: config.pbtxt parsed with tritonclient's own ModelConfig protobuf and checked,
field by field, against the exported ONNX graph; the served model runs at the batch the config promises."""
import json

import numpy as np
import onnx
import pytest
import timm

from vitrim.export.release import release
from vitrim.export.target import Target
from vitrim.export.triton import TritonRepo, model_config, to_pbtxt, write_triton_repo
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import sha256_file
from vitrim.pipeline.core.preprocessing import FMNIST_PREPROCESSING
from vitrim.pipeline.core.rundir import RunDir
from tests.conftest import TINY_KW, random_init

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason="tritonclient is not installed (pip install 'vitrim[triton]'; make test installs it)")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    """A real ORT-CPU release of a tiny ViT: batch 8, 1 thread, graph optimization level 'extended'."""
    d = tmp_path_factory.mktemp("triton")
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)) for _ in range(2)]
    release(d / "rel", Target(batch=8, threads=1, opt_level="extended"), data, model=model, warmup=1, repeats=3,
            preprocessing=FMNIST_PREPROCESSING, log=lambda m: None)
    return d / "rel"


def parse(path) -> "mc.ModelConfig":
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def triton_type(elem_type: int) -> str:
    """Triton's type of an ONNX element type, through numpy and tritonclient's own table (not vitrim's)."""
    from tritonclient.utils import np_to_triton_dtype

    return "TYPE_" + np_to_triton_dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def test_repository_fields_match_the_onnx_graph(rel, tmp_path):
    path = write_triton_repo(rel, tmp_path / "repo", "fmnist student/v2", max_batch=16, log=lambda m: None)
    repo = TritonRepo(tmp_path / "repo")
    name = "fmnist_student_v2"  # a folder name Triton accepts
    assert path == repo.config(name)
    cfg = parse(path)
    served = repo.model_file(name, "model.onnx")
    m = json.loads(RunDir(rel).manifest.read_text())
    assert sha256_file(served) == m["artifacts"]["onnx"]["sha256"]  # the release's own graph, byte for byte
    assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16

    g = onnx.load(str(served)).graph
    inits = {i.name for i in g.initializer}
    for declared, values in ((cfg.input, [v for v in g.input if v.name not in inits]), (cfg.output, g.output)):
        assert [d.name for d in declared] == [v.name for v in values]
        for d, v in zip(declared, values):
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].HasField("dim_value")  # the batch dim is dynamic...
            assert list(d.dims) == [x.dim_value for x in dims[1:]]  # ...and Triton's dims are the rest
            assert mc.DataType.Name(d.data_type) == triton_type(v.type.tensor_type.elem_type)
    assert mc.ModelInput.Format.Name(cfg.input[0].format) == "FORMAT_" + m["preprocessing"]["layout"] == "FORMAT_NCHW"
    assert [mc.ModelInstanceGroup.Kind.Name(i.kind) for i in cfg.instance_group] == ["KIND_CPU"]
    assert cfg.HasField("dynamic_batching") and list(cfg.dynamic_batching.preferred_batch_size) == [8]
    # served as measured: the release's thread count, sequential execution, ORT level 'extended' (Triton's 1)
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert cfg.parameters["execution_mode"].string_value == "0"
    assert cfg.optimization.graph.level == 1

    # the served graph takes every batch up to max_batch_size and returns the declared dims
    import onnxruntime as ort

    sess = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    for b in (1, cfg.max_batch_size):
        x = np.zeros((b, *cfg.input[0].dims), dtype=np.float32)
        (y,) = sess.run(None, {cfg.input[0].name: x})
        assert y.shape == (b, *cfg.output[0].dims)


def test_default_max_batch_and_the_writer_without_tritonclient(rel, tmp_path):
    m = json.loads(RunDir(rel).manifest.read_text())
    cfg = model_config(m, RunDir(rel).onnx, "tiny")
    assert cfg["max_batch_size"] == m["device_signature"]["batch"] == 8  # default: the batch it was timed at
    # the small writer (no tritonclient) gives the very message tritonclient's text_format writes
    plain = text_format.Parse(to_pbtxt(cfg, use_protobuf=False), mc.ModelConfig())
    assert plain == text_format.Parse(to_pbtxt(cfg, use_protobuf=True), mc.ModelConfig())
    assert plain.max_batch_size == 8 and plain.parameters["intra_op_thread_count"].string_value == "1"


def test_tensorrt_plan_config_and_refusals(rel):
    m = json.loads(RunDir(rel).manifest.read_text())
    graph = RunDir(rel).onnx
    trt = {**m, "device_signature": {**m["device_signature"], "backend": "tensorrt", "threads": 0, "opt_level": "",
                                     "max_batch": 32}}
    cfg = text_format.Parse(to_pbtxt(model_config(trt, graph, "tiny")), mc.ModelConfig())
    # the plan's optimization profile bounds the batch; it runs on the GPU; ORT's session options do not apply
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert [mc.ModelInstanceGroup.Kind.Name(i.kind) for i in cfg.instance_group] == ["KIND_GPU"]
    assert not cfg.parameters and not cfg.HasField("optimization")
    with pytest.raises(UserError, match="exceeds the TensorRT plan's profile max batch 32"):
        model_config(trt, graph, "tiny", max_batch=64)
    torch_rel = {**m, "device_signature": {**m["device_signature"], "backend": "torch-cpu"}}
    with pytest.raises(UserError, match="torch program"):
        model_config(torch_rel, graph, "tiny")


def test_a_graph_with_external_data_is_served_with_its_weights(rel, tmp_path):
    """`--triton` used to copy model.onnx alone: ORT then refused the repository ("External data path
    validation failed"). The weights now travel beside the served graph, and the Triton copy loads."""
    import onnxruntime as ort

    from vitrim.export.release import external_data_files

    src = tmp_path / "theirs"
    src.mkdir()
    m = onnx.load(str(RunDir(rel).onnx))
    onnx.save(m, str(src / "graph.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="graph.weights", size_threshold=1024)
    assert external_data_files(src / "graph.onnx") == ["graph.weights"]
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)) for _ in range(2)]
    out = tmp_path / "rel"
    release(out, Target(batch=8, threads=1), data, onnx_path=src / "graph.onnx", warmup=1, repeats=3,
            log=lambda m: None)
    write_triton_repo(out, tmp_path / "repo", "ext", log=lambda m: None)
    served = TritonRepo(tmp_path / "repo").model_file("ext", "model.onnx")
    assert (served.parent / "graph.weights").is_file()
    x = data[0][0]
    ref = ort.InferenceSession(str(RunDir(rel).onnx), providers=["CPUExecutionProvider"])
    want = ref.run(None, {ref.get_inputs()[0].name: x})[0]
    sess = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])  # loads from the repository alone
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_array_equal(got, want)
