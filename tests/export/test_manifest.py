"""The release manifest: written only for a passed gate, hashes re-checked, a moved directory still verifies."""
import json
import shutil
from pathlib import Path

import pytest

from vitrim.export.manifest import MANIFEST_SCHEMA, verify_manifest, write_manifest
from vitrim.pipeline.core.errors import InternalError, UserError
from vitrim.pipeline.core.io import sha256_file
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


# --- issue 24: a relocatable, tamper-evident release directory, on a real tiny release ------------------------

@pytest.fixture(scope="module")
def real_release(tmp_path_factory, fmnist_dir):
    """`vitrim export --teacher` of a tiny random-init ViT on 96 Fashion-MNIST test images: a real release
    directory (ONNX, ORT engine, parity.json, verdict.json, manifest.json). Tests copy it before changing it."""
    import timm
    import yaml

    from tests.conftest import TINY_KW, random_init
    from vitrim.pipeline.cli import main
    from vitrim.pipeline.core.models import save_weights

    d = tmp_path_factory.mktemp("real-release")
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=3, std=0.2)
    save_weights(model, d / "teacher.safetensors")
    cfg = {"data": {"root": fmnist_dir, "train_limit": 256, "val_limit": 64, "test_limit": 96, "val_size": 1000},
           "model": {"arch": "vit_tiny_patch16_224", "kwargs": dict(TINY_KW),
                     "checkpoint": str(d / "teacher.safetensors")},
           "target": {"batch": 16, "threads": 1}, "profile": {"warmup": 2, "repeats": 6},
           "out_dir": str(d / "run"), "cache_dir": str(d / "cache")}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(d / "c.yaml"), "--teacher", "--out", str(d / "rel")]) == 0
    return d


def _copy(real_release, tmp_path, name="rel") -> RunDir:
    return RunDir(shutil.copytree(real_release / "rel", tmp_path / name))


def _rewrite(rd: RunDir, fn) -> None:
    m = json.loads(rd.manifest.read_text())
    fn(m)
    rd.manifest.write_text(json.dumps(m))


def test_real_release_is_relative_and_verifies_after_a_copy(real_release, tmp_path):
    rd = _copy(real_release, tmp_path)
    m = json.loads(rd.manifest.read_text())
    assert {"onnx", "engine", "parity"} <= set(m["artifacts"])
    for e in m["artifacts"].values():  # relative, inside, no '..'
        assert not e["path"].startswith("/") and ".." not in e["path"].split("/") and (rd.root / e["path"]).is_file()
    moved = RunDir(shutil.copytree(rd.root, tmp_path / "a" / "b" / "moved"))
    shutil.rmtree(rd.root)  # nothing of the original is needed
    assert verify_manifest(moved.root)["artifacts"] == m["artifacts"]


def test_a_given_onnx_outside_the_directory_is_copied_in(real_release, tmp_path):
    """`vitrim export --onnx FILE`: the manifest used to record FILE's absolute path; the release now carries it."""
    from vitrim.pipeline.cli import main

    given = shutil.copy(real_release / "rel" / "model.onnx", tmp_path / "theirs.onnx")
    out = tmp_path / "rel"
    assert main(["export", str(real_release / "c.yaml"), "--onnx", str(given), "--out", str(out)]) == 0
    m = json.loads(RunDir(out).manifest.read_text())
    assert m["artifacts"]["onnx"]["path"] == "theirs.onnx" and (out / "theirs.onnx").is_file()
    assert m["parity"]["onnx"] == "theirs.onnx"
    Path(given).unlink()  # the user's file goes away (or changes): the release does not depend on it
    verify_manifest(shutil.copytree(out, tmp_path / "moved"))


def test_write_manifest_refuses_an_artifact_outside_the_directory(tmp_path):
    rd = RunDir(tmp_path / "release").mkdir()
    outside = tmp_path / "lut.json"
    outside.write_text("{}")
    rd.parity.write_text(json.dumps(PASSED))
    common = dict(parity=PASSED, signature={}, accuracy={}, latency={}, config_hash="")
    with pytest.raises(UserError, match="'lut' at .* is outside the release directory") as e:
        write_manifest(rd.root, {"parity": rd.parity, "lut": outside}, **common)
    assert "copy it into the directory" in e.value.fix
    (rd.root / "lut.json").symlink_to(outside)  # a symlink inside that points out is outside too
    with pytest.raises(UserError, match="outside the release directory"):
        write_manifest(rd.root, {"lut": rd.root / "lut.json"}, **common)
    assert not rd.manifest.exists()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_paths_that_leave_the_directory_fail_verification(real_release, tmp_path, how):
    """Each of these verified as OK before: the file exists and its sha256 matches, but it is not in the release."""
    rd = _copy(real_release, tmp_path)
    victim = tmp_path / "elsewhere" / "hostname"
    victim.parent.mkdir()
    victim.write_text("not part of the release\n")
    if how == "absolute":
        path = str(victim)
    elif how == "dotdot":
        path = "../elsewhere/hostname"
    else:
        (rd.root / "hostname").symlink_to(victim)
        path = "hostname"
    _rewrite(rd, lambda m: m["artifacts"].update({"extra": {"path": path, "sha256": sha256_file(victim), "bytes": 24}}))
    expect = {"absolute": "is absolute", "dotdot": r"leaves the release directory \('\.\.'\)",
              "symlink": "resolves outside the release directory"}[how]
    with pytest.raises(UserError, match=f"extra: path .*{expect}"):
        verify_manifest(rd.root)


@pytest.mark.parametrize("name", ["notes.txt", "model.ONNX", "model.trt", "weights.pt", "weights.pth", "model.bin",
                                  "libcustom_op.so", "sub/other.onnx"])
def test_any_unlisted_file_fails_verification_naming_it(real_release, tmp_path, name):
    """No suffix list: a file of any name beside the engine (a second graph, a custom-op library) fails."""
    rd = _copy(real_release, tmp_path)
    verify_manifest(rd.root)
    (rd.root / name).parent.mkdir(exist_ok=True)
    (rd.root / name).write_bytes(b"something a server could pick up")
    with pytest.raises(UserError, match=f"{name}: a file the manifest does not list"):
        verify_manifest(rd.root)


def test_escaping_symlinks_fail_verification(real_release, tmp_path):
    rd = _copy(real_release, tmp_path)
    (rd.root / "weights").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UserError, match="weights: a symlink leaving the release directory"):
        verify_manifest(rd.root)


@pytest.mark.parametrize("victim", ["verdict.json", "MODEL_CARD.md", "parity.json", "resolved_config.yaml"])
def test_every_file_of_the_release_is_covered(real_release, tmp_path, victim):
    """A flipped verdict, an edited card: each verified before, because only model artifacts were hashed."""
    rd = _copy(real_release, tmp_path)
    p = rd.root / victim
    assert p.is_file()
    if victim == "verdict.json":
        v = json.loads(p.read_text())
        v.update(passed=False, exit_code=3)
        p.write_text(json.dumps(v))
    else:
        p.write_text(p.read_text() + "\nedited\n")
    with pytest.raises(UserError, match=f"{victim}: has changed"):
        verify_manifest(rd.root)
    p.unlink()
    with pytest.raises(UserError, match=f"{victim}: missing"):
        verify_manifest(rd.root)


def test_a_nested_release_is_covered_by_its_parent(real_release, tmp_path):
    """`vitrim run` keeps the teacher's release in teacher/. Its engine replaced and its own manifest rewritten to
    match used to verify (the nested release was checked only against its own, unsigned, manifest)."""
    from vitrim.export.manifest import seal_manifest

    rd = _copy(real_release, tmp_path)
    nested = RunDir(shutil.copytree(rd.root, rd.root / "teacher"))
    with pytest.raises(UserError, match="teacher/model.onnx: a file the manifest does not list"):
        verify_manifest(rd.root)
    seal_manifest(rd.root)  # what the stage that writes teacher/ does
    verify_manifest(rd.root)
    nested.onnx.write_bytes(nested.onnx.read_bytes() + b"\0")
    with pytest.raises(UserError, match="teacher/onnx: 'teacher/model.onnx' has changed"):
        verify_manifest(rd.root)
    # the attacker rewrites the nested manifest to match (its artifact record and file list): the parent still knows
    _rewrite(nested, lambda m: m["artifacts"]["onnx"].update(sha256=sha256_file(nested.onnx)))
    seal_manifest(nested.root)
    verify_manifest(nested.root)
    with pytest.raises(UserError) as e:
        verify_manifest(rd.root)
    assert "teacher/manifest.json: has changed" in str(e.value) and "teacher/model.onnx: has changed" in str(e.value)


def _keys(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    paths = []
    for who in ("release", "mallory"):
        k = ed25519.Ed25519PrivateKey.generate()
        priv, pub = tmp_path / f"{who}.pem", tmp_path / f"{who}.pub.pem"
        priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
        paths += [priv, pub]
    return paths


def test_sign_and_verify_with_ed25519_and_a_tampered_manifest_fails(real_release, tmp_path, capsys):
    pytest.importorskip("cryptography")  # the `sign` extra; `make test` installs it (dev)
    from vitrim.pipeline.cli import main

    rd = _copy(real_release, tmp_path)
    key, pub, other_key, other_pub = _keys(tmp_path)
    assert main(["verify-manifest", str(rd.root), "--pubkey", str(pub)]) == 2  # unsigned
    assert f"vitrim sign {rd.root} --key" in capsys.readouterr().err
    assert main(["sign", str(rd.root), "--key", str(key), "--pubkey", str(pub)]) == 0
    assert len(rd.manifest_signature.read_bytes()) == 64  # a raw Ed25519 signature, detached
    moved = RunDir(shutil.copytree(rd.root, tmp_path / "moved"))
    assert main(["verify-manifest", str(moved.root), "--pubkey", str(pub)]) == 0
    capsys.readouterr()
    assert main(["verify-manifest", str(moved.root), "--pubkey", str(other_pub)]) == 2  # someone else's key
    assert "does not match" in capsys.readouterr().err
    # a manifest edited after signing (every artifact still matches its, now rewritten, record) fails
    _rewrite(moved, lambda m: m["latency"].update({"median_ms": m["latency"]["median_ms"] / 2}))
    verify_manifest(moved.root)  # the hashes alone cannot tell
    assert main(["verify-manifest", str(moved.root), "--pubkey", str(pub)]) == 2
    assert "the manifest changed after signing" in capsys.readouterr().err
    # a bad key file is a user error naming the fix; signing a tampered directory is refused
    assert main(["sign", str(moved.root), "--key", str(other_pub)]) == 2
    assert "not a PEM private key" in capsys.readouterr().err
    moved.onnx.write_bytes(b"swapped")
    assert main(["sign", str(moved.root), "--key", str(other_key)]) == 2
    assert "onnx: 'model.onnx' has changed" in capsys.readouterr().err


def test_a_signed_release_fails_when_any_file_changes_and_checks_the_bytes_it_signed(real_release, tmp_path, capsys):
    pytest.importorskip("cryptography")
    from vitrim.pipeline.cli import main

    rd = _copy(real_release, tmp_path)
    key, pub, _, _ = _keys(tmp_path)
    assert main(["sign", str(rd.root), "--key", str(key)]) == 0
    assert main(["verify-manifest", str(rd.root), "--pubkey", str(pub)]) == 0
    v = json.loads(rd.verdict.read_text())
    rd.verdict.write_text(json.dumps({**v, "passed": True, "exit_code": 0}) + " ")  # a "flipped" verdict
    capsys.readouterr()
    assert main(["verify-manifest", str(rd.root), "--pubkey", str(pub)]) == 2
    assert "verdict.json: has changed" in capsys.readouterr().err
    # given a file path, the signature and the content check read the same file: another file is refused
    other = rd.root / "other.json"
    shutil.copy(rd.manifest, other)
    assert main(["verify-manifest", str(other), "--pubkey", str(pub)]) == 2
    assert "is not a release manifest" in capsys.readouterr().err


def test_resealing_keeps_a_valid_signature_and_says_when_it_drops_one(real_release, tmp_path, capsys):
    """A stage that reseals a signed release without changing it keeps the signature; one that adds a file
    removes it (it signed the old manifest) and says so, naming the command that signs again."""
    pytest.importorskip("cryptography")
    from vitrim.export.manifest import seal_manifest
    from vitrim.pipeline.cli import main

    rd = _copy(real_release, tmp_path)
    key, pub, _, _ = _keys(tmp_path)
    assert main(["sign", str(rd.root), "--key", str(key)]) == 0
    said = []
    seal_manifest(rd.root, log=said.append)
    assert said == [] and rd.manifest_signature.is_file()
    assert main(["verify-manifest", str(rd.root), "--pubkey", str(pub)]) == 0
    (rd.root / "compare.json").write_text("{}")
    seal_manifest(rd.root, log=said.append)
    assert not rd.manifest_signature.exists() and len(said) == 1
    assert "signature was removed" in said[0] and f"vitrim sign {rd.root}" in said[0]
    verify_manifest(rd.root)  # the new file is listed
    capsys.readouterr()
    assert main(["verify-manifest", str(rd.root), "--pubkey", str(pub)]) == 2  # unsigned now, and told so


def test_verify_hashes_each_file_once(real_release, tmp_path, monkeypatch):
    import vitrim.export.manifest as manifest

    rd = _copy(real_release, tmp_path)
    shutil.copytree(rd.root, tmp_path / "inner")
    shutil.move(tmp_path / "inner", rd.root / "teacher")  # a nested release, as a run holds its teacher's
    manifest.seal_manifest(rd.root)
    seen = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: seen.append(Path(p).resolve()) or real(p))
    verify_manifest(rd.root)
    assert any("teacher" in p.parts for p in seen)  # the nested release was checked
    assert len(seen) == len(set(seen)), [p.name for p in seen]
