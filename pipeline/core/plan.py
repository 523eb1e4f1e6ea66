"""The Plan: a pruned ViT architecture as plain data (NViT-style per-block dims).

A Plan lists the *kept indices* (not just counts) of every prunable group, keyed
by block number, so slicing is reproducible from the teacher alone::

    {"schema": 1, "spec": {...teacher description...},
     "embed_keep": [0, 1, ...],
     "blocks": [{"keep": true, "heads": [0, 2], "qk": [...], "v": [...], "mlp": [...]}, ...],
     "tokens": null}

QK and V indices are dims *within* a head, shared by all the block's kept heads
(as in NViT). Dims, parameter counts and MACs are derived properties.

``tokens`` is null (no token reduction) or ``{"merges": [{"block": i, "type": t}, ...]}``:
before teacher block ``i`` the patch grid is merged (CAIT-style, see
:class:`vitrim.pipeline.core.compact.TokenMerge`) by type ``w`` (h, w) -> (h, ceil(w/2)),
``h`` -> (ceil(h/2), w) or ``hw`` -> (ceil(h/2), ceil(w/2)). A merge sits at a block
*boundary*, so it applies whether or not block ``i`` itself is kept. The file also
carries ``grids``, the patch grid entering every block (derived; checked on load).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.rundir import RunDir

PLAN_FILE = RunDir(".").plan.name  # the name a run gives its plan, for messages

SCHEMA_VERSION = 1
MERGE_TYPES = {"w": (1, 2), "h": (2, 1), "hw": (2, 2)}  # merge window (rows, cols) of each type


def merged_grid(grid: tuple[int, int], kind: str) -> tuple[int, int]:
    """The patch grid after a merge of type ``kind`` (odd sides round up: the last row/column merges alone)."""
    sh, sw = MERGE_TYPES[kind]
    return (-(-grid[0] // sh), -(-grid[1] // sw))


def merge_valid(grid: tuple[int, int], kind: str) -> bool:
    """A merge must halve every side it merges; merging a side of 1 is impossible."""
    sh, sw = MERGE_TYPES[kind]
    return (sh == 1 or grid[0] > 1) and (sw == 1 or grid[1] > 1)


def block_macs(N: int, E: int, H: int, QK: int, V: int, M: int) -> int:
    """Multiply-accumulates of one block per image at ``N`` tokens: QKV, scores, weighted sum, proj, MLP."""
    return N * E * (2 * H * QK + H * V) + H * N * N * (QK + V) + N * H * V * E + 2 * N * E * M


@dataclass
class Floors:
    """Minimum widths the search may not go below (NViT / hardware floors)."""

    heads: int = 1
    qk: int = 8
    v: int = 8
    mlp: int = 16

    @classmethod
    def from_config(cls, search) -> "Floors":
        """The floors a search config sets (``search.min_heads``, ``min_qk``, ``min_v``, ``min_mlp``)."""
        return cls(heads=search.min_heads, qk=search.min_qk, v=search.min_v, mlp=search.min_mlp)


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
    def num_prefix(self) -> int:
        s = self.spec
        return int(s["class_token"]) + int(s["dist_token"]) + int(s.get("reg_tokens", 0))

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, cols) of the input image."""
        s = self.spec
        fh, fw = s["stem"]["feature_size"] if s.get("stem") else s["img_size"]  # a hybrid's stem feature map
        return (fh // s["patch_size"][0], fw // s["patch_size"][1])

    @property
    def num_tokens(self) -> int:
        """Tokens entering the network (patches plus class/distillation/register tokens)."""
        h, w = self.grid
        return h * w + self.num_prefix

    @property
    def merges(self) -> dict[int, str]:
        """{block index: merge type} of the token merges (empty: none)."""
        if not self.tokens:
            return {}
        return {int(m["block"]): m["type"] for m in self.tokens.get("merges", [])}

    def set_merges(self, merges: dict[int, str]) -> "Plan":
        """Replace the token merges in place (an empty dict clears ``tokens``)."""
        self.tokens = ({"merges": [{"block": i, "type": merges[i]} for i in sorted(merges)]} if merges else None)
        return self

    def block_grids(self) -> list[tuple[int, int]]:
        """The patch grid entering every teacher block (after the merge at its boundary, if any)."""
        g, m, out = self.grid, self.merges, []
        for i in range(len(self.blocks)):
            if i in m:
                g = merged_grid(g, m[i])
            out.append(g)
        return out

    def block_tokens(self) -> list[int]:
        """Tokens entering every teacher block (class/distillation tokens included)."""
        return [h * w + self.num_prefix for h, w in self.block_grids()]

    def merge_inputs(self) -> dict[int, tuple[int, int]]:
        """{block index: the grid a merge at that boundary receives}."""
        g, out = self.grid, {}
        for i, kind in sorted(self.merges.items()):
            out[i] = g
            g = merged_grid(g, kind)
        return out

    def block_dims(self) -> list[tuple[int, int, int, int]]:
        return [b.dims for b in self.blocks]

    # -- analytic cost ------------------------------------------------------
    def num_params(self) -> int:
        s, E = self.spec, self.embed_dim
        stem, nc = s.get("stem"), s["num_classes"]
        C = stem["out_chans"] if stem else s["in_chans"]
        ph, pw = s["patch_size"]
        prefix = self.num_prefix
        n = E * C * ph * pw + (E if s["patch_bias"] else 0) + (stem["params"] if stem else 0)
        n += prefix * E
        n += (self.num_tokens - (0 if not s["no_embed_class"] else prefix)) * E
        n += 2 * E * int(s["pre_norm"]) + 2 * E * int(s["final_norm"]) + 2 * E * int(s["fc_norm"])
        pool = s.get("attn_pool")
        if pool:  # kept whole; kv reads the kept embedding channels
            D, Mp = pool["dim"], pool["mlp_hidden"]
            n += pool["latent_len"] * D + (D * D + D * 2 * E) + (3 * D if pool["qkv_bias"] else 0) + D * D + D
            n += 2 * D * int(pool["norm"]) + D * Mp + Mp + Mp * D + D
            n += D * nc + nc
        else:
            n += (E * nc + nc) * (2 if s["dist_token"] else 1)
        glu = 2 if s.get("mlp_glu") else 1
        for b in self.blocks:
            if not b.keep:
                continue
            H, QK, V, M = b.dims
            qkv = 2 * H * QK + H * V
            n += 4 * E  # two LayerNorms
            n += E * qkv + (qkv if s["qkv_bias"] else 0)
            pb = int(s.get("proj_bias", True))
            n += H * V * E + E * pb
            n += glu * (E * M + M * pb) + M * E + E * pb
            n += 4 * QK if s.get("qk_norm") else 0
            n += 2 * E if s["layer_scale"] else 0
        return n

    def macs(self) -> int:
        """Multiply-accumulates per image (matmuls and attention; a hybrid's CNN stem as timm's FLOP counter has it)."""
        s, E = self.spec, self.embed_dim
        ph, pw = s["patch_size"]
        grid = self.num_tokens - self.num_prefix
        stem = s.get("stem")
        n = grid * E * (stem["out_chans"] if stem else s["in_chans"]) * ph * pw + (stem["macs"] if stem else 0)
        pool = s.get("attn_pool")
        if pool:
            D, L, Np = pool["dim"], pool["latent_len"], self.block_tokens()[-1] - (
                0 if s.get("pool_include_prefix") else self.num_prefix)
            n += L * D * D + Np * E * 2 * D + 2 * L * Np * D + L * D * D + 2 * L * D * pool["mlp_hidden"]
            n += D * s["num_classes"]
        else:
            n += E * s["num_classes"] * (2 if s["dist_token"] else 1)
        for b, N in zip(self.blocks, self.block_tokens()):
            if b.keep:
                n += block_macs(N, E, *b.dims)
                if s.get("mlp_glu"):
                    n += N * E * b.dims[3]  # fc1 computes the gate and the value
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
        self.check_tokens(source)
        return self

    def check_tokens(self, source: str) -> None:
        t = self.tokens
        if t is None:
            return
        fix = 'use null, or {"merges": [{"block": i, "type": "w" | "h" | "hw"}, ...]}'
        if not isinstance(t, dict) or not isinstance(t.get("merges"), list) or set(t) - {"merges", "grids"}:
            raise UserError("plan", f"{source}: tokens must be null or an object with a 'merges' list", fix)
        seen = set()
        for k, m in enumerate(t["merges"]):
            if not isinstance(m, dict) or set(m) != {"block", "type"}:
                raise UserError("plan", f"{source}: tokens.merges[{k}] must have exactly 'block' and 'type'", fix)
            i, kind = m["block"], m["type"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.blocks):
                raise UserError("plan", f"{source}: tokens.merges[{k}].block is {i!r}, not a block 0..{len(self.blocks) - 1}", fix)
            if kind not in MERGE_TYPES:
                raise UserError("plan", f"{source}: tokens.merges[{k}].type is {kind!r}", f"use one of {', '.join(MERGE_TYPES)}")
            if i in seen:
                raise UserError("plan", f"{source}: two token merges before block {i}", "merge at most once per block boundary (type hw merges both sides)")
            seen.add(i)
        for i, g in self.merge_inputs().items():
            if not merge_valid(g, self.merges[i]):
                raise UserError("plan", f"{source}: merge '{self.merges[i]}' before block {i} is impossible: the grid "
                                f"there is {g[0]}x{g[1]}", "drop that merge or merge along a side longer than 1")
        if "grids" in t and [list(g) for g in t["grids"]] != [list(g) for g in self.block_grids()]:
            raise UserError("plan", f"{source}: tokens.grids do not follow from tokens.merges",
                            "delete 'grids' (vitrim derives them) or fix the merges")

    # -- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "spec": self.spec, "embed_keep": list(self.embed_keep),
                "blocks": [b.to_dict() for b in self.blocks], "meta": self.meta,
                "tokens": None if not self.merges else {"merges": self.tokens["merges"],
                                                        "grids": [list(g) for g in self.block_grids()]},
                "derived": {"embed_dim": self.embed_dim, "blocks": [list(d) for d in self.block_dims()],
                            "params": self.num_params(), "macs": self.macs()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise UserError("plan", f"{source}: not a JSON object", f"use a {PLAN_FILE} written by vitrim")
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
            raise UserError("plan", f"{source}: malformed plan ({type(e).__name__}: {e})", f"use a {PLAN_FILE} written by vitrim") from None
        return plan.validate(source=source)

    def save(self, path: str | os.PathLike) -> None:
        from vitrim.pipeline.core.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        from vitrim.pipeline.core.io import read_json

        d = read_json(path, "plan", "plan file", f"run `vitrim search` first (it writes {PLAN_FILE}), or pass the right path")
        return cls.from_dict(d, source=str(path))

    def summary(self) -> str:
        rows = [f"embed {self.embed_dim}/{self.spec['embed_dim']}  params {self.num_params() / 1e6:.3f}M  MACs {self.macs() / 1e6:.1f}M"]
        merges, grids = self.merges, self.block_grids()
        for i, b in enumerate(self.blocks):
            if i in merges:
                rows.append(f"  merge '{merges[i]}' -> grid {grids[i][0]}x{grids[i][1]}")
            rows.append(f"  block {i:2d}: " + ("skipped" if not b.keep else "H=%d QK=%d V=%d MLP=%d" % b.dims))
        return "\n".join(rows)
