import json

from vitrim.pipeline.stages.teacher import load_teacher, teacher_path


def test_tiny_teacher_beats_chance_and_is_cached(tiny_cfg):
    model, info = load_teacher(tiny_cfg)
    assert info["test_top1"] > 30.0, info  # chance is 10%
    path = teacher_path(tiny_cfg)
    assert path.is_file() and json.loads(path.with_suffix(".json").read_text())["test_top1"] == info["test_top1"]
    assert not list(path.parent.glob(".*.work/checkpoint.pt"))
    again, info2 = load_teacher(tiny_cfg)
    assert info2["source"] == str(path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert a.equal(b)
