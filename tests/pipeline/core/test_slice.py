"""Plan + physical slicing: bit-identity, equivalence to gated teachers, ONNX, params."""
import copy
import json
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.pipeline.core.slicing import load_compact, save_compact, slice_model
from tests.conftest import random_init

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
VARIANTS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("deit_base_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_patch16_224", {"qkv_bias": False}),
    ("deit3_small_patch16_224", {}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    ("vit_tiny_patch16_224", {"pre_norm": True}),
    ("vit_tiny_patch16_224", {"proj_bias": False}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "final_norm": False}),
]
IDS = [a + "".join(f"-{k}={v}" for k, v in kw.items()) for a, kw in VARIANTS]


def make(arch, kw, seed=0):
    m = timm.create_model(arch, **SMALL, **kw)
    return random_init(m, seed=seed, std=0.2)


def random_plan(spec, rng: random.Random, embed: bool = False, skip: bool = True) -> Plan:
    H, hd, M, E = spec["num_heads"], spec["head_dim"], spec["mlp_hidden"], spec["embed_dim"]
    sub = lambda n, lo: sorted(rng.sample(range(n), rng.randint(lo, n)))  # noqa: E731
    blocks = []
    for i in range(spec["depth"]):
        if skip and i > 0 and rng.random() < 0.35:
            blocks.append(BlockPlan(False))
        else:
            blocks.append(BlockPlan(True, sub(H, 1), sub(hd, 1), sub(hd, 1), sub(M, 1)))
    emb = sub(E, E // 3) if embed else list(range(E))
    return Plan(spec=spec, embed_keep=emb, blocks=blocks).validate()


def gated_teacher(teacher, plan):
    """The teacher with every pruned unit zeroed: the reference for head/QK/V/MLP/block pruning."""
    t = copy.deepcopy(teacher)
    s = plan.spec
    H, hd = s["num_heads"], s["head_dim"]
    with torch.no_grad():
        for i, blk in enumerate(t.blocks):
            b = plan.blocks[i]
            if not b.keep:
                for lin in (blk.attn.proj, blk.mlp.fc2):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            for h in range(H):
                for d in range(hd):
                    if d not in b.qk:  # q_d = 0 removes q_d*k_d from every score
                        blk.attn.qkv.weight[h * hd + d].zero_()
                        if blk.attn.qkv.bias is not None:
                            blk.attn.qkv.bias[h * hd + d].zero_()
                    if h not in b.heads or d not in b.v:
                        blk.attn.proj.weight[:, h * hd + d].zero_()
            drop = [j for j in range(s["mlp_hidden"]) if j not in b.mlp]
            blk.mlp.fc2.weight[:, drop] = 0
    return t


@pytest.mark.parametrize("arch,kw", VARIANTS, ids=IDS)
def test_keep_everything_is_bit_identical(arch, kw):
    teacher = make(arch, kw)
    student = slice_model(teacher, Plan.full(describe(teacher, arch)))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), student(x))


@pytest.mark.parametrize("arch,kw", VARIANTS, ids=IDS)
def test_random_plans_match_gated_teacher(arch, kw):
    teacher = make(arch, kw, seed=1)
    spec = describe(teacher, arch)
    rng = random.Random(0)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        plan = random_plan(spec, rng)
        student = slice_model(teacher, plan)
        with torch.no_grad():
            ref, out = gated_teacher(teacher, plan)(x), student(x)
        assert (ref - out).abs().max().item() <= 1e-5
        assert sum(p.numel() for p in student.parameters()) == plan.num_params()
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def reference_forward(teacher, plan, x):
    """An independent functional ViT over the teacher's own (timm-named) weights,
    keeping only the plan's embedding channels, heads, QK/V dims and MLP units."""
    sd = teacher.state_dict()
    s = plan.spec
    e = torch.tensor(plan.embed_keep)
    eps, H, hd = s["norm_eps"], s["num_heads"], s["head_dim"]
    ln = lambda t, p: F.layer_norm(t, (len(e),), sd[p + ".weight"][e], sd[p + ".bias"][e], eps)  # noqa: E731
    t = F.conv2d(x, sd["patch_embed.proj.weight"][e], sd["patch_embed.proj.bias"][e], stride=s["patch_size"])
    t = t.flatten(2).transpose(1, 2)
    prefix = [sd[n][..., e].expand(x.shape[0], -1, -1) for n in ("cls_token", "dist_token") if n in sd]
    pos = sd["pos_embed"][..., e]
    if s["no_embed_class"]:
        t = torch.cat(prefix + [t + pos], 1)
    else:
        t = torch.cat(prefix + [t], 1) + pos
    for i, b in enumerate(plan.blocks):
        if not b.keep:
            continue
        p = f"blocks.{i}."
        hN = ln(t, p + "norm1")
        W, B = sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias")
        out = 0
        for h in b.heads:
            def proj(block, dims):
                rows = [block * H * hd + h * hd + d for d in dims]
                y = hN @ W[rows][:, e].T
                return y + B[rows] if B is not None else y
            q, k, v = proj(0, b.qk), proj(1, b.qk), proj(2, b.v)
            a = torch.softmax(q @ k.transpose(1, 2) * hd ** -0.5, -1) @ v
            cols = [h * hd + d for d in b.v]
            out = out + a @ sd[p + "attn.proj.weight"][e][:, cols].T
        out = out + sd[p + "attn.proj.bias"][e]
        if p + "ls1.gamma" in sd:
            out = out * sd[p + "ls1.gamma"][e]
        t = t + out
        hN = ln(t, p + "norm2")
        m = torch.tensor(b.mlp)
        y = F.gelu(hN @ sd[p + "mlp.fc1.weight"][m][:, e].T + sd[p + "mlp.fc1.bias"][m])
        y = y @ sd[p + "mlp.fc2.weight"][e][:, m].T + sd[p + "mlp.fc2.bias"][e]
        if p + "ls2.gamma" in sd:
            y = y * sd[p + "ls2.gamma"][e]
        t = t + y
    t = ln(t, "norm")
    return t[:, 0] @ sd["head.weight"][:, e].T + sd["head.bias"]


@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_embedding_pruning_matches_independent_reference(arch):
    teacher = make(arch, {}, seed=2)
    spec = describe(teacher, arch)
    rng = random.Random(1)
    x = torch.randn(3, 3, 32, 32)
    for _ in range(3):
        plan = random_plan(spec, rng, embed=True)
        assert plan.embed_dim < spec["embed_dim"]
        student = slice_model(teacher, plan)
        with torch.no_grad():
            diff = (reference_forward(teacher, plan, x) - student(x)).abs().max().item()
        assert diff <= 1e-5
        assert sum(p.numel() for p in student.parameters()) == plan.num_params()


def test_onnx_dynamic_batch_matches_torch(tmp_path):
    import onnxruntime as ort

    from vitrim.export.onnx import export_onnx

    teacher = make("deit_tiny_distilled_patch16_224", {}, seed=3)
    spec = describe(teacher)
    plan = random_plan(spec, random.Random(5), embed=True)
    student = slice_model(teacher, plan)
    path = export_onnx(student, tmp_path / "s.onnx", (3, 32, 32))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = student(x).numpy()
        assert got.shape == want.shape == (b, 5)
        assert np.abs(got - want).max() <= 1e-4


def test_save_and_load_compact_without_teacher(tmp_path):
    teacher = make("deit3_small_patch16_224", {}, seed=4)
    plan = random_plan(describe(teacher), random.Random(2), embed=True)
    student = slice_model(teacher, plan)
    save_compact(student, plan, tmp_path / "s")
    again = load_compact(tmp_path / "s")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), again(x))
    d = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert d["derived"]["params"] == plan.num_params()


def test_bad_plans_are_refused(tmp_path):
    teacher = make("deit_tiny_patch16_224", {})
    spec = describe(teacher)
    good = Plan.full(spec).to_dict()

    def bad(mutate, match):
        d = json.loads(json.dumps(good))
        mutate(d)
        with pytest.raises(UserError, match=match):
            Plan.from_dict(d)

    bad(lambda d: d["blocks"][0].__setitem__("heads", [2, 0]), "sorted and unique")
    bad(lambda d: d["blocks"][0].__setitem__("heads", [0, 0]), "sorted and unique")
    bad(lambda d: d["blocks"][1].__setitem__("mlp", [0, 9999]), "outside")
    bad(lambda d: d["blocks"][1].__setitem__("qk", []), "minimum")
    bad(lambda d: d.__setitem__("embed_keep", [-1, 3]), "outside")
    bad(lambda d: d["blocks"].pop(), "teacher has 3")
    bad(lambda d: [b.__setitem__("keep", False) for b in d["blocks"]], "every block is skipped")
    bad(lambda d: d.__setitem__("schema", 0), "schema")
    bad(lambda d: d["blocks"][0].__setitem__("hedas", [0]), "unknown keys")
    bad(lambda d: d["blocks"][0].__setitem__("v", ["a"]), "list of integers")
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Plan.load(tmp_path / "p.json")
    with pytest.raises(UserError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    # a plan for another teacher fails loudly at slice time
    other = timm.create_model("deit_tiny_patch16_224", **{**SMALL, "embed_dim": 96})
    with pytest.raises(UserError, match="spec does not match"):
        slice_model(other, Plan.full(spec))


def test_slice_cli_writes_a_loadable_student(tmp_path):
    import yaml

    from vitrim.pipeline.cli import main
    from vitrim.pipeline.core.models import save_weights
    from tests.conftest import TINY_KW

    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5)
    save_weights(teacher, tmp_path / "t.safetensors")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"arch": "vit_tiny_patch16_224", "kwargs": dict(TINY_KW)},
                                                     "cache_dir": str(tmp_path / "cache")}))
    plan = random_plan(describe(teacher), random.Random(3), embed=True)
    plan.save(tmp_path / "plan.json")
    assert main(["slice", str(tmp_path / "c.yaml"), "--teacher", str(tmp_path / "t.safetensors"),
                 "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "s")]) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "s")(x), slice_model(teacher, plan)(x))
    # a corrupt teacher checkpoint is a user error, not a traceback
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main(["slice", str(tmp_path / "c.yaml"), "--teacher", str(tmp_path / "bad.safetensors"),
                 "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "s2")]) == 2
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize("arch,kw", [VARIANTS[3], VARIANTS[6]], ids=[IDS[3], IDS[6]])
def test_unslice_writes_a_students_weights_back_where_its_plan_keeps_them(arch, kw):
    """A progressive curve continues from a fine-tuned student (search.start_weights: student): its weights go back
    into the full-size state at the units its plan kept; every other unit keeps the full-size state's value."""
    from vitrim.pipeline.core.models import canonical_state
    from vitrim.pipeline.core.slicing import slice_state, unslice_state

    base, other = canonical_state(make(arch, kw, 0)), canonical_state(make(arch, kw, 1))
    plan = random_plan(describe(make(arch, kw)), random.Random(3), embed=True)
    student = slice_state(other, plan)
    back = unslice_state(base, student, plan)
    again = slice_state(back, plan)
    assert set(again) == set(student) and all(torch.equal(again[k], student[k]) for k in student)
    changed = sum(int((back[k] != base[k]).sum()) for k in base)
    assert 0 < changed < sum(v.numel() for v in base.values())  # pruned units keep the base's values
    assert all(torch.equal(base[k], canonical_state(make(arch, kw, 0))[k]) for k in base)  # the input is not touched
