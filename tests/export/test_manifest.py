"""The release manifest: written only for a passed gate, hashes re-checked, a moved directory still verifies."""
import json
import shutil

import pytest

from vitrim.export.manifest import MANIFEST_SCHEMA, verify_manifest, write_manifest
from vitrim.pipeline.core.errors import InternalError, UserError
from vitrim.pipeline.core.rundir import RunDir

PASSED = {"passed": True, "precision": "fp32"}


def _release(tmp_path):
    rd = RunDir(tmp_path / "release").mkdir()
    rd.onnx.write_bytes(b"graph bytes")
    rd.parity.write_text(json.dumps(PASSED))
    path = write_manifest(rd.root, {"onnx": rd.onnx, "parity": rd.parity}, parity=PASSED, signature={"backend": "ort-cpu"},
                          accuracy={"top1": 90.0}, latency={"median_ms": 1.0}, config_hash="abc",
                          preprocessing={"input_size": [1, 28, 28]})
    return rd, path


def test_manifest_records_relative_hashed_artifacts_and_verifies(tmp_path):
    rd, path = _release(tmp_path)
    assert path == rd.manifest
    m = json.loads(path.read_text())
    assert m["schema"] == MANIFEST_SCHEMA and m["preprocessing"] == {"input_size": [1, 28, 28]}
    assert m["artifacts"]["onnx"]["path"] == "model.onnx" and len(m["artifacts"]["onnx"]["sha256"]) == 64
    assert "onnxruntime" in m["libraries"] and "torch" in m["libraries"]
    assert verify_manifest(rd.root)["config_hash"] == "abc"
    moved = shutil.copytree(rd.root, tmp_path / "elsewhere")  # relative paths: the copy verifies on its own
    rd.onnx.write_bytes(b"changed")
    verify_manifest(moved)


def test_tampered_missing_or_corrupt_manifest_fails(tmp_path):
    rd, path = _release(tmp_path)
    rd.onnx.write_bytes(b"graph bytes, tampered")
    with pytest.raises(UserError, match="onnx: .* has changed"):
        verify_manifest(rd.root)
    rd.onnx.unlink()
    with pytest.raises(UserError, match="onnx: .* is missing"):
        verify_manifest(rd.root)
    path.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        verify_manifest(rd.root)
    path.write_text(json.dumps({"schema": MANIFEST_SCHEMA + 1, "artifacts": {}}))
    with pytest.raises(UserError, match="schema"):
        verify_manifest(rd.root)
    path.unlink()
    with pytest.raises(UserError, match="no manifest"):
        verify_manifest(rd.root)


def test_no_manifest_for_a_failed_gate_or_a_missing_artifact(tmp_path):
    rd = RunDir(tmp_path).mkdir()
    rd.onnx.write_bytes(b"x")
    common = dict(signature={}, accuracy={}, latency={}, config_hash="")
    with pytest.raises(InternalError, match="failed the parity gate"):
        write_manifest(rd.root, {"onnx": rd.onnx}, parity={"passed": False}, **common)
    with pytest.raises(UserError, match="artifact 'engine'"):
        write_manifest(rd.root, {"engine": rd.ort_engine}, parity=PASSED, **common)
    assert not rd.manifest.exists()
