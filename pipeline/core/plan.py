"""The Plan: a pruned ViT architecture as plain data (NViT-style per-block dims).

A Plan lists the *kept indices* (not just counts) of every prunable group, keyed
by block number, so slicing is reproducible from the teacher alone::

    {"schema": 1, "spec": {...teacher description...},
     "embed_keep": [0, 1, ...],
     "blocks": [{"keep": true, "heads": [0, 2], "qk": [...], "v": [...], "mlp": [...]}, ...],
     "tokens": null}

QK and V indices are dims *within* a head, shared by all the block's kept heads
(as in NViT). Dims, parameter counts and MACs are derived properties.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vitrim.pipeline.core.errors import UserError

SCHEMA_VERSION = 1


@dataclass
class Floors:
    """Minimum widths the search may not go below (NViT / hardware floors)."""

    heads: int = 1
    qk: int = 8
    v: int = 8
    mlp: int = 16


@dataclass
class BlockPlan:
    keep: bool = True
    heads: list[int] = field(default_factory=list)
    qk: list[int] = field(default_factory=list)
    v: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(H, QK, V, M), all zero for a skipped block."""
        if not self.keep:
            return (0, 0, 0, 0)
        return (len(self.heads), len(self.qk), len(self.v), len(self.mlp))

    def to_dict(self) -> dict:
        return {"keep": self.keep, "heads": list(self.heads), "qk": list(self.qk), "v": list(self.v), "mlp": list(self.mlp)}


@dataclass
class Plan:
    spec: dict
    embed_keep: list[int]
    blocks: list[BlockPlan]
    tokens: Any = None
    meta: dict = field(default_factory=dict)

    # -- construction -----------------------------------------------------
    @classmethod
    def full(cls, spec: dict) -> "Plan":
        """The keep-everything plan of a teacher (slices to a bit-identical model)."""
        H, hd, M = spec["num_heads"], spec["head_dim"], spec["mlp_hidden"]
        blocks = [BlockPlan(True, list(range(H)), list(range(hd)), list(range(hd)), list(range(M)))
                  for _ in range(spec["depth"])]
        return cls(spec=dict(spec), embed_keep=list(range(spec["embed_dim"])), blocks=blocks)

    def copy(self) -> "Plan":
        return Plan.from_dict(self.to_dict())

    # -- derived dims -----------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return len(self.embed_keep)

    @property
    def kept_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.keep]

    @property
    def num_tokens(self) -> int:
        s = self.spec
        grid = 1
        for a, p in zip(s["img_size"], s["patch_size"]):
            grid *= a // p
        return grid + int(s["class_token"]) + int(s["dist_token"])

    def block_dims(self) -> list[tuple[int, int, int, int]]:
        return [b.dims for b in self.blocks]

    # -- analytic cost ------------------------------------------------------
    def num_params(self) -> int:
        s, E = self.spec, self.embed_dim
        C, nc = s["in_chans"], s["num_classes"]
        ph, pw = s["patch_size"]
        prefix = int(s["class_token"]) + int(s["dist_token"])
        n = E * C * ph * pw + (E if s["patch_bias"] else 0)
        n += prefix * E
        n += (self.num_tokens - (0 if not s["no_embed_class"] else prefix)) * E
        n += 2 * E * int(s["pre_norm"]) + 2 * E * int(s["final_norm"]) + 2 * E * int(s["fc_norm"])
        n += (E * nc + nc) * (2 if s["dist_token"] else 1)
        for b in self.blocks:
            if not b.keep:
                continue
            H, QK, V, M = b.dims
            qkv = 2 * H * QK + H * V
            n += 4 * E  # two LayerNorms
            n += E * qkv + (qkv if s["qkv_bias"] else 0)
            pb = int(s.get("proj_bias", True))
            n += H * V * E + E * pb
            n += E * M + M * pb + M * E + E * pb
            n += 2 * E if s["layer_scale"] else 0
        return n

    def macs(self) -> int:
        """Multiply-accumulates per image (matmuls and attention)."""
        s, E, N = self.spec, self.embed_dim, self.num_tokens
        ph, pw = s["patch_size"]
        grid = N - int(s["class_token"]) - int(s["dist_token"])
        n = grid * E * s["in_chans"] * ph * pw
        n += E * s["num_classes"] * (2 if s["dist_token"] else 1)
        for b in self.blocks:
            if b.keep:
                H, QK, V, M = b.dims
                n += N * E * (2 * H * QK + H * V) + H * N * N * (QK + V) + N * H * V * E + 2 * N * E * M
        return n

    # -- validation -------------------------------------------------------
    def validate(self, floors: Floors | None = None, source: str = "plan") -> "Plan":
        """Check indices (in range, sorted, unique, non-empty) and optional floors."""
        s = self.spec
        for key in ("embed_dim", "depth", "num_heads", "head_dim", "mlp_hidden"):
            if not isinstance(s.get(key), int):
                raise UserError("plan", f"{source}: spec.{key} is missing", "produce the plan with vitrim (search/slice) from a teacher")

        def check(name: str, idx: list[int], n: int, floor: int = 1) -> None:
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise UserError("plan", f"{source}: {name} must be a list of integers", "fix the plan file")
            if len(idx) < max(floor, 1):
                raise UserError("plan", f"{source}: {name} keeps {len(idx)} < minimum {max(floor, 1)}",
                                "keep more units, or skip the whole block with keep=false")
            if idx != sorted(set(idx)):
                raise UserError("plan", f"{source}: {name} must be sorted and unique", "sort the indices and drop duplicates")
            if idx[0] < 0 or idx[-1] >= n:
                raise UserError("plan", f"{source}: {name} has an index outside 0..{n - 1}", "use indices of the teacher's units")

        f = floors or Floors(1, 1, 1, 1)
        check("embed_keep", self.embed_keep, s["embed_dim"])
        if len(self.blocks) != s["depth"]:
            raise UserError("plan", f"{source}: {len(self.blocks)} blocks listed, the teacher has {s['depth']}",
                            "list every teacher block (keep=false to skip one)")
        if not self.kept_blocks:
            raise UserError("plan", f"{source}: every block is skipped", "keep at least one block")
        for i, b in enumerate(self.blocks):
            if not isinstance(b.keep, bool):
                raise UserError("plan", f"{source}: blocks[{i}].keep must be true or false", "fix the plan file")
            if not b.keep:
                continue
            check(f"blocks[{i}].heads", b.heads, s["num_heads"], f.heads)
            check(f"blocks[{i}].qk", b.qk, s["head_dim"], f.qk)
            check(f"blocks[{i}].v", b.v, s["head_dim"], f.v)
            check(f"blocks[{i}].mlp", b.mlp, s["mlp_hidden"], f.mlp)
        if self.tokens is not None:
            raise UserError("plan", f"{source}: token reduction ('tokens') is not supported yet", "set tokens to null")
        return self

    # -- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "spec": self.spec, "embed_keep": list(self.embed_keep),
                "blocks": [b.to_dict() for b in self.blocks], "tokens": self.tokens, "meta": self.meta,
                "derived": {"embed_dim": self.embed_dim, "blocks": [list(d) for d in self.block_dims()],
                            "params": self.num_params(), "macs": self.macs()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise UserError("plan", f"{source}: not a JSON object", "use a plan.json written by vitrim")
        if d.get("schema") != SCHEMA_VERSION:
            raise UserError("plan", f"{source}: schema {d.get('schema')!r}, this vitrim reads schema {SCHEMA_VERSION}",
                            "re-create the plan with this version of vitrim")
        try:
            blocks = []
            for i, b in enumerate(d["blocks"]):
                unknown = set(b) - {"keep", "heads", "qk", "v", "mlp"}
                if unknown:
                    raise UserError("plan", f"{source}: blocks[{i}] has unknown keys {sorted(unknown)}", "fix the plan file")
                blocks.append(BlockPlan(b.get("keep", True), list(b.get("heads", [])), list(b.get("qk", [])),
                                        list(b.get("v", [])), list(b.get("mlp", []))))
            plan = cls(spec=dict(d["spec"]), embed_keep=list(d["embed_keep"]), blocks=blocks,
                       tokens=d.get("tokens"), meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError) as e:
            raise UserError("plan", f"{source}: malformed plan ({type(e).__name__}: {e})", "use a plan.json written by vitrim") from None
        return plan.validate(source=source)

    def save(self, path: str | os.PathLike) -> None:
        from vitrim.pipeline.core.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        from vitrim.pipeline.core.io import read_json

        d = read_json(path, "plan", "plan file", "run `vitrim search` first (it writes plan.json), or pass the right path")
        return cls.from_dict(d, source=str(path))

    def summary(self) -> str:
        rows = [f"embed {self.embed_dim}/{self.spec['embed_dim']}  params {self.num_params() / 1e6:.3f}M  MACs {self.macs() / 1e6:.1f}M"]
        for i, b in enumerate(self.blocks):
            rows.append(f"  block {i:2d}: " + ("skipped" if not b.keep else "H=%d QK=%d V=%d MLP=%d" % b.dims))
        return "\n".join(rows)
