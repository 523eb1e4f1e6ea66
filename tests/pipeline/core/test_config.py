import pytest
import yaml

from vitrim.pipeline.core.config import load_config, save_resolved
from vitrim.pipeline.core.errors import UserError


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, {"search": {"budget_fraction": 0.4}, "target": {"batch": 16}}))
    assert cfg.search.budget_fraction == 0.4
    assert cfg.target.batch == 16
    assert cfg.target.backend == "ort-cpu"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'search\.budgett'"):
        load_config(write(tmp_path, {"search": {"budgett": 0.4}}))
    with pytest.raises(UserError, match=r"unknown key 'serach'"):
        load_config(write(tmp_path, {"serach": {}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(UserError, match=r"'target\.batch' must be int"):
        load_config(write(tmp_path, {"target": {"batch": "big"}}))
    with pytest.raises(UserError, match=r"'search' must be a mapping"):
        load_config(write(tmp_path, {"search": 3}))


def test_bad_values_and_yaml(tmp_path):
    with pytest.raises(UserError, match="target.backend"):  # the name itself is the registry's (test_backends)
        load_config(write(tmp_path, {"target": {"backend": ""}}))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "search: [1, 2"))
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["search.budget_fraction=0.3", "model.kwargs={depth: 3}", "data.root=/x"])
    assert cfg.search.budget_fraction == 0.3
    assert cfg.model.kwargs == {"depth": 3}
    assert cfg.data.root == "/x"
    with pytest.raises(UserError, match="search.nope"):
        load_config(None, ["search.nope=1"])
    with pytest.raises(UserError, match="of the form"):
        load_config(None, ["search.budget_fraction"])


def test_int_accepted_for_float_and_resolved_written(tmp_path):
    cfg = load_config(None, ["teacher.lr=1"])
    assert isinstance(cfg.teacher.lr, float) and cfg.teacher.lr == 1.0
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob("configs/*.yaml"))
    assert "configs/fmnist_cpu.yaml" in paths
    for p in paths:
        load_config(p)


def test_device_and_data_values_are_checked():
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.errors import UserError

    for bad, key in (("device=tpu", "device"), ("data.workers=-1", "data.workers"),
                     ("data.interpolation=lanczos9", "data.interpolation"), ("export.parity_images=0", "export.parity_images")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_exponent_floats_without_a_dot():
    cfg = load_config(None, ["export.fp32.atol=1e-12", "search.budget_ms=5e1"])
    assert cfg.export.fp32.atol == 1e-12 and cfg.search.budget_ms == 50.0
    with pytest.raises(UserError, match="export.fp32.atol"):
        load_config(None, ["export.fp32.atol=tiny"])


def test_two_budgets_are_refused_naming_both(tmp_path):
    with pytest.raises(UserError, match=r"search\.budget_ms and search\.budget_fraction"):
        load_config(write(tmp_path, {"search": {"budget_ms": 8.0, "budget_fraction": 0.5}}))
    with pytest.raises(UserError, match=r"search\.budget_ms and search\.flops_fraction"):
        load_config(None, ["search.budget_ms=8", "search.flops_fraction=0.5"])
    from vitrim.pipeline.core.config import SearchConfig, validate_search

    with pytest.raises(UserError, match=r"search\.budget_ms and search\.budget_fraction"):  # configs built in code
        validate_search(SearchConfig(budget_ms=8.0, budget_fraction=0.5))


def test_one_budget_replaces_the_default_and_the_files(tmp_path):
    from vitrim.pipeline.core.config import DEFAULT_BUDGET_FRACTION

    cfg = load_config(None)  # nothing set anywhere: the default fraction, written explicitly
    assert (cfg.search.budget_fraction, cfg.search.budget_ms) == (DEFAULT_BUDGET_FRACTION, None)
    cfg = load_config(None, ["search.budget_ms=8"])  # the default does not collide with an explicit budget
    assert (cfg.search.budget_ms, cfg.search.budget_fraction) == (8.0, None)
    cfg = load_config("configs/fmnist_cpu.yaml", ["search.budget_ms=8"])  # the demo sets budget_fraction
    assert (cfg.search.budget_ms, cfg.search.budget_fraction) == (8.0, None)
    cfg = load_config(write(tmp_path, {"search": {"flops_fraction": 0.4}}))
    assert (cfg.search.flops_fraction, cfg.search.budget_fraction) == (0.4, None)


def test_zero_align_is_refused():
    with pytest.raises(UserError, match=r"'search\.align' is 0"):
        load_config(None, ["search.align=0"])


def test_the_recipe_and_merge_keys_are_checked():
    """Issue 25's keys: merge scoring, fixed merges, prune-finetune epochs, hidden-state distillation."""
    for bad, key in (("search.merge_scoring=learned", "search.merge_scoring"),
                     ("search.merges=[{block: 2}]", r"search.merges\[0\]"),
                     ("search.merges=[{block: 2, type: diag}]", r"search.merges\[0\]"),
                     ("search.merges=[{block: 2, type: hw}, {block: 2, type: w}]", "search.merges"),
                     ("search.step_epochs=-1", "search.step_epochs"),
                     ("finetune.hidden_weight=-0.5", "finetune.hidden_weight"),
                     ("finetune.epochs=-1", "finetune.epochs")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config(None, [bad])
    with pytest.raises(UserError, match="search.merges"):
        load_config(None, ["search.strategy=uvc", "search.merges=[{block: 2, type: hw}]"])
    with pytest.raises(UserError, match=r"search\.merge_adapt_iters"):
        load_config(None, ["search.prune_tokens=true", "search.merge_scoring=adapted", "search.merge_adapt_iters=0"])
    assert load_config(None, ["search.prune_tokens=true", "search.merge_adapt_iters=0"])  # unadapted, the default
    with pytest.raises(UserError, match=r"search\.merges\[0\]"):  # an unhashable type: a clean error, not a crash
        load_config(None, ["search.merges=[{block: 2, type: [hw]}]"])
    cfg = load_config(None, ["search.merges=[{block: 4, type: hw}]", "search.merge_scoring=unadapted",
                             "search.step_epochs=0.5", "finetune.hidden_weight=1"])
    assert cfg.search.merges == [{"block": 4, "type": "hw"}] and cfg.finetune.hidden_weight == 1.0
    assert load_config(None, ["search.merge_scoring=unadapted", "search.merge_adapt_iters=0"])


def test_a_nested_parity_tolerance_keeps_its_precision_defaults():
    """`export.fp16.atol` in a YAML or a --set changes that key alone: fp16 keeps its own defaults for the rest."""
    from vitrim.pipeline.core.config import ExportConfig

    cfg = load_config(None, ["export.fp16.atol=0.05"])
    assert cfg.export.fp16.atol == 0.05 and cfg.export.fp16.max_rel_l2 == ExportConfig().fp16.max_rel_l2
    assert cfg.export.tolerance("fp8") == cfg.export.int8
    for bad, key in (("export.int8.max_acc_loss=-1", r"export\.int8\.max_acc_loss"),
                     ("export.fp32.min_top1_agreement=1.5", r"export\.fp32\.min_top1_agreement"),
                     ("export.confidence=1.0", r"export\.confidence"), ("export.parity_worst=0", r"export\.parity_worst"),
                     ("export.fp16.nonsense=1", r"export\.fp16\.nonsense")):
        with pytest.raises(UserError, match=key):
            load_config(None, [bad])


def test_runtime_threads_sets_torchs_intra_op_threads(capsys):
    import torch

    from types import SimpleNamespace

    from vitrim.pipeline import cli

    before = torch.get_num_threads()
    try:
        cli._cfg(SimpleNamespace(config="configs/fmnist_cpu.yaml", set=["runtime.threads=1"]))
        assert torch.get_num_threads() == 1
        assert "[runtime] torch intra-op threads: 1 (runtime.threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="runtime.threads"):
        load_config(None, ["runtime.threads=0"])
