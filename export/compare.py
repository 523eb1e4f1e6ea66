"""The regression gate: a candidate release against a baseline release, measured now, on this machine.

A release job must stop a build that is slower or less accurate than the last release. Stored
milliseconds cannot decide that: they were measured at other times, under other loads, maybe on
another machine. :func:`compare_releases` therefore

1. verifies both manifests (every artifact re-hashed) and refuses two releases whose device
   signatures differ, naming the fields, and a machine other than the one they were measured on;
2. re-times both engines round-robin in one session with :func:`~vitrim.export.runners.time_ratio`:
   each candidate visit is bracketed by baseline visits and the figure is the median of the
   per-visit ratios, so a load burst on a shared machine hits both sides of each ratio. A second
   session of the baseline engine rides in the same rotation as an A/A control: its ratio to the
   baseline is the noise of this very measurement. A ratio within twice that noise of the
   threshold does not decide: up to ``export.compare_sessions`` sessions run and the gate takes
   the median of their ratios;
3. re-evaluates both engines on the same test images (top-1 each, and how many images only one
   of them gets right) and decides the accuracy loss with McNemar's exact test on those paired
   predictions (:func:`~vitrim.export.stats.paired_accuracy`): its interval against
   ``max_acc_regression`` (0.3 pt by default) gives PASS, FAIL or INCONCLUSIVE;
4. decides the latency the same way: the paired ratio against ``1 + max_latency_regression`` (3%
   slower at most by default), INCONCLUSIVE while it lies within twice the A/A control's deviation
   of the threshold after every allowed session (a machine too noisy to decide).

``compare.json`` (every figure) is written either way, and the two gate entries are merged into
the ``verdict.json`` beside it (:mod:`vitrim.export.verdict`; Polygraphy's ``--save-results``,
MLflow's ``validate_evaluation_results``: the evidence stays on disk); a failure then raises
:class:`~vitrim.pipeline.core.errors.RegressionGateError`, which the CLI turns into exit 5; an
undecided gate with no failure raises :class:`~vitrim.pipeline.core.errors.InconclusiveError` (exit 6):
rerun on a quiet machine, or evaluate more images.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from vitrim.export.runners import Runner
from vitrim.export.stats import FAIL, INCONCLUSIVE, paired_accuracy, ratio_outcome
from vitrim.export.target import DeviceSignature, Target
from vitrim.pipeline.core.errors import EXIT_REGRESSION, UserError
from vitrim.pipeline.core.rundir import RunDir

COMPARE_SCHEMA = 2


@dataclass
class Release:
    """A verified release directory: its manifest, its device signature, its engine's runners."""

    root: Path
    manifest: dict
    signature: DeviceSignature
    manifest_sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike, role: str) -> "Release":
        """Verify ``path``'s manifest (every artifact re-hashed) and read its signature."""
        from vitrim.export.manifest import verify_manifest
        from vitrim.pipeline.core.io import sha256_file

        root = Path(path)
        if not root.is_dir():
            raise UserError("compare", f"the {role} release '{root}' is not a directory",
                            f"pass the directory `vitrim export --out` or `vitrim run` wrote (it holds {RunDir(root).manifest.name})")
        m = verify_manifest(root)
        sig = m.get("device_signature")
        try:
            signature = DeviceSignature.from_dict(sig)
        except UserError:
            raise UserError("compare", f"the {role} release '{root}' has no usable device signature in its manifest",
                            "re-export it with this vitrim version") from None
        return cls(root, m, signature, sha256_file(RunDir(root).manifest))

    def artifact(self, key: str) -> Optional[Path]:
        """The manifest's artifact ``key`` as a path (relative entries are inside the release)."""
        e = self.manifest["artifacts"].get(key)
        if e is None:
            return None
        p = Path(e["path"])
        return p if p.is_absolute() else self.root / p

    def _need(self, key: str) -> Path:
        p = self.artifact(key)
        if p is None:
            raise UserError("compare", f"the release '{self.root}' lists no '{key}' artifact in its manifest",
                            "re-export it with this vitrim version")
        return p

    def target(self) -> Target:
        """The target the release was made for, as its signature records it."""
        s = self.signature
        return Target(s.backend, s.precision, s.batch, s.threads, s.opt_level or "all",
                      s.max_batch or None)

    def timing_runner(self) -> Runner:
        """The engine as :func:`~vitrim.export.release.release` timed it (the LUT's runner code)."""
        t = self.target()
        if t.impl.engine_is_graph:  # timed from its graph, optimized at session start, as the LUT timed it
            return t.impl.onnx_runner(self.artifact(f"onnx_{t.precision}") or self._need("onnx"), t)
        return self.eval_runner()

    def eval_runner(self) -> Runner:
        """The engine artifact the parity gate passed (ORT's saved optimized graph, an OpenVINO IR, the TensorRT
        plan, the program)."""
        t = self.target()
        return t.impl.engine_runner(self._need("engine"), t)

    def preprocessing_key(self) -> Optional[dict]:
        """The recorded preprocessing without its sources and recipe text (what changes the input)."""
        p = self.manifest.get("preprocessing")
        if not p:
            return None
        return {k: v for k, v in p.items() if k not in ("sources", "steps")}

    def describe(self) -> dict:
        m = self.manifest
        return {"dir": str(self.root), "manifest_sha256": self.manifest_sha256,
                "name": (m.get("model") or {}).get("name"), "created": m.get("created"),
                "recorded": {"engine_top1": (m.get("accuracy") or {}).get("engine_top1"),
                             "median_ms": (m.get("latency") or {}).get("median_ms")}}


def check_same_target(base: Release, cand: Release) -> None:
    """Refuse two releases measured for different targets, naming each differing field and both values."""
    diff = base.signature.diff(cand.signature)
    if diff:
        detail = "; ".join(f"{f}: {getattr(base.signature, f)!r} vs {getattr(cand.signature, f)!r}" for f in diff)
        raise UserError("compare", f"the releases were made for different targets (differs in: {', '.join(diff)}): "
                        f"{detail}. Baseline [{base.signature}], candidate [{cand.signature}]",
                        "compare releases of the same target: re-export the baseline on this machine with the "
                        "candidate's target settings (vitrim export ... --out DIR)")


def check_this_machine(sig: DeviceSignature) -> dict:
    """Refuse to re-time releases on another device or engine version than they were measured for.

    A ratio measured on another CPU is not the ratio on the release's device, and the
    engine version changes the kernels. Returns this machine's device and engine version.
    """
    from vitrim.export.target import engine_version

    here = {"device": Target(backend=sig.backend, precision=sig.precision).device_name(),
            "engine_version": engine_version(sig.backend)}
    diff = [k for k in ("device", "engine_version") if here[k] != getattr(sig, k)]
    if diff:
        detail = "; ".join(f"{k}: release {getattr(sig, k)!r}, here {here[k]!r}" for k in diff)
        raise UserError("compare", f"this machine is not the one the releases were measured for ({detail})",
                        "run vitrim compare on a machine of the releases' device signature, or re-export both "
                        "releases here")
    return here


def _images_labels(batch) -> tuple[np.ndarray, np.ndarray]:
    x, y = batch[0], batch[1]
    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    y = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def evaluate_pair(base: Runner, cand: Runner, data: Iterable, max_images: Optional[int] = None) -> dict:
    """Top-1 of both (activated) engines on the same batches, streamed (up to ``max_images``), and the
    images only one of them gets right (McNemar's discordant pairs)."""
    n = right_b = right_c = only_b = only_c = agree = 0
    for batch in data:
        if max_images is not None and n >= max_images:
            break
        x, y = _images_labels(batch)
        if max_images is not None:
            x, y = x[:max_images - n], y[:max_images - n]
        ob, oc = base.infer(x), cand.infer(x)  # a NaN row has no class: it counts as a wrong answer
        pb = np.where(np.isfinite(ob).all(1), ob.argmax(1), -1)
        pc = np.where(np.isfinite(oc).all(1), oc.argmax(1), -1)
        ok_b, ok_c = pb == y, pc == y
        n += len(y)
        right_b, right_c = right_b + int(ok_b.sum()), right_c + int(ok_c.sum())
        only_b, only_c = only_b + int((ok_b & ~ok_c).sum()), only_c + int((ok_c & ~ok_b).sum())
        agree += int((pb == pc).sum())
    if n == 0:
        raise UserError("compare", "the test split is empty", "check data.root and data.test_limit")
    return {"images": n, "baseline_top1": 100.0 * right_b / n, "candidate_top1": 100.0 * right_c / n,
            "delta_pt": 100.0 * (right_c - right_b) / n, "agreement": agree / n,
            "only_baseline_right": only_b, "only_candidate_right": only_c}


def time_pair(base: Release, cand: Release, rounds: int, repeats: int, warmup: int, sessions: int = 3,
              threshold: float = 0.03, log: Callable[[str], None] = print) -> dict:
    """Both engines round-robin in one session: baseline, candidate, baseline, A, baseline per round.

    A is a second session of the baseline engine. The figure of a session is
    :func:`~vitrim.export.runners.time_ratio`'s: the median over rounds of each candidate visit
    over the baseline visits around it; the A/A ratio, measured the same way, is the noise of
    that very session. A session whose ratio lies within twice its noise of the threshold does
    not decide: another session runs (up to ``sessions``), and the gate takes the median of the
    sessions' ratios.
    """
    from vitrim.export.runners import interleaved, time_ratio

    batch = base.signature.batch
    runs: list[dict] = []
    for k in range(max(1, sessions)):
        runners = [base.timing_runner(), cand.timing_runner(), base.timing_runner()]
        with interleaved(runners) as active:
            timings, (ratio, aa) = time_ratio(active, batch, repeats=repeats, rounds=rounds, warmup=warmup)
        runs.append({"ratio": ratio, "aa_ratio": aa, "baseline": timings[0].to_dict(),
                     "candidate": timings[1].to_dict(), "baseline_aa": timings[2].to_dict()})
        med = float(np.median([r["ratio"] for r in runs]))
        noise = max(abs(r["aa_ratio"] - 1.0) for r in runs)
        log(f"[compare] timing session {k + 1}: candidate/baseline {ratio:.3f}, A/A control {aa:.3f}")
        if abs(med - 1.0 - threshold) > 2 * noise:
            break  # the verdict stands clear of this measurement's noise
    last = runs[-1]
    ratio = float(np.median([r["ratio"] for r in runs]))
    return {"protocol": "round-robin sessions on this machine; per round: baseline, candidate, baseline, baseline "
                        "again (a second session: the A/A control), baseline; a session's ratio is the median over "
                        "rounds of each visit's median over the median of the baseline visits around it; another "
                        "session runs while the median ratio lies within twice the largest A/A deviation of the "
                        "threshold",
            "batch": batch, "rounds": rounds, "repeats": repeats, "warmup": warmup,
            "ratio": ratio,
            "aa_ratio": max((r["aa_ratio"] for r in runs), key=lambda v: abs(v - 1.0)),
            "baseline": last["baseline"], "candidate": last["candidate"], "sessions": runs}


def markdown_table(result: dict) -> str:
    """The verdict as a Markdown table (what `vitrim compare` prints)."""
    lat, acc = result["latency"], result["accuracy"]
    g = {x["check"]: x for x in result["gates"]}
    gl, ga = g["latency"], g["accuracy"]
    mark = lambda g: {"pass": "pass", "fail": "**FAIL**", "inconclusive": "**INCONCLUSIVE**"}[g["outcome"]]  # noqa: E731
    rows = [
        "| | baseline | candidate | change | gate | verdict |",
        "|---|---:|---:|---:|---|---|",
        f"| latency, median ms (batch {lat['batch']}, one session) | {lat['baseline']['median_ms']:.3f} | "
        f"{lat['candidate']['median_ms']:.3f} | {100 * (lat['ratio'] - 1):+.1f}% (paired ratio {lat['ratio']:.3f}) | "
        f"<= {100 * (gl['threshold'] - 1):+.1f}% | {mark(gl)} |",
        f"| A/A control: the baseline against itself | | | {100 * (lat['aa_ratio'] - 1):+.1f}% | noise of this "
        f"measurement ({len(lat['sessions'])} session{'s' if len(lat['sessions']) > 1 else ''}) | |",
        f"| test top-1 % ({acc['images']} images) | {acc['baseline_top1']:.2f} | {acc['candidate_top1']:.2f} | "
        f"{acc['delta_pt']:+.2f} pt | loss <= {ga['threshold']:.2f} pt | {mark(ga)} |",
        f"| accuracy loss, {100 * acc['test']['confidence']:g}% interval (McNemar exact) | | | "
        f"[{acc['test']['ci_pt'][0]:+.2f}, {acc['test']['ci_pt'][1]:+.2f}] pt | | |",
        f"| top-1 agreement | | | {100 * acc['agreement']:.2f}% ({acc['only_baseline_right']} images only the "
        f"baseline gets right, {acc['only_candidate_right']} only the candidate) | | |",
    ]
    head = f"**{result['outcome'].upper()}**: candidate `{result['candidate']['dir']}` against " \
           f"baseline `{result['baseline']['dir']}` on {result['signature']['backend']}/" \
           f"{result['signature']['precision']} ({result['machine']['device']})"
    return head + "\n\n" + "\n".join(rows) + "\n"


def compare_releases(baseline: str | os.PathLike, candidate: str | os.PathLike, data: Iterable, *,
                     max_latency_regression: float = 0.03, max_acc_regression: float = 0.3, rounds: int = 20,
                     repeats: int = 200, warmup: int = 10, sessions: int = 3, out: str | os.PathLike | None = None,
                     data_preprocessing: Optional[dict] = None, max_images: Optional[int] = None,
                     confidence: float = 0.95, log: Callable[[str], None] = print) -> dict:
    """Gate ``candidate`` against ``baseline`` (two release directories); write ``compare.json``.

    Args:
        data: ``(images, labels)`` batches of the test images both engines are evaluated on.
        max_latency_regression: the candidate may be this fraction slower (paired ratio - 1).
        max_acc_regression: the candidate's top-1 may be this many points lower, decided with
            McNemar's exact test at ``confidence`` (two-sided interval).
        rounds, repeats, warmup: one paired timing session (``repeats`` candidate runs over ``rounds`` visits).
        sessions: timing sessions at most, while the ratio is within the session's noise of the threshold.
        out: where ``compare.json`` goes (default: the candidate directory).
        data_preprocessing: ``Preprocessing.to_dict()`` of ``data``; refused when the releases expect another.
        max_images: evaluate at most this many images (``export.parity_images``; None: all of ``data``).

    Returns:
        The content of ``compare.json``.

    Raises:
        UserError: different device signatures or preprocessing, another machine, a tampered release.
        RegressionGateError: after writing ``compare.json`` and ``verdict.json``, when a gate fails (exit 5).
        InconclusiveError: likewise, when no gate failed but one could not decide (exit 6).
    """
    from vitrim.export.manifest import seal_manifest
    from vitrim.pipeline.core.io import atomic_write_json

    out_rd = RunDir(out if out is not None else candidate)
    base, cand = Release.load(baseline, "baseline"), Release.load(candidate, "candidate")
    if out_rd.compare.is_file():  # never leave an earlier comparison beside a refused one
        out_rd.compare.unlink()
        seal_manifest(out_rd.root, log=log)
    check_same_target(base, cand)
    pb, pc = base.preprocessing_key(), cand.preprocessing_key()
    if pb is not None and pc is not None and pb != pc:
        diff = sorted(k for k in set(pb) | set(pc) if pb.get(k) != pc.get(k))
        raise UserError("compare", f"the releases expect different inputs (preprocessing differs in: {', '.join(diff)})",
                        "compare releases of one model family with one preprocessing")
    want = pc or pb
    if data_preprocessing is not None and want is not None:
        got = {k: v for k, v in data_preprocessing.items() if k not in ("sources", "steps")}
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise UserError("compare", f"the test images would be preprocessed unlike the releases expect "
                            f"(differs in: {', '.join(diff)})", "pass the config the releases were made with "
                            f"(--config, or the candidate's {RunDir(candidate).resolved_config.name})")
    here = check_this_machine(base.signature)
    log(f"[compare] baseline {base.root} vs candidate {cand.root} on [{base.signature}]")

    from vitrim.export.runners import interleaved

    with interleaved([base.eval_runner(), cand.eval_runner()]) as (rb, rc):
        acc = evaluate_pair(rb, rc, data, max_images)
    test = paired_accuracy(acc["only_baseline_right"], acc["only_candidate_right"], acc["images"], max_acc_regression,
                           confidence)
    acc["test"] = test.to_dict()
    log(f"[compare] top-1 on {acc['images']} test images: baseline {acc['baseline_top1']:.2f}%, candidate "
        f"{acc['candidate_top1']:.2f}% ({acc['delta_pt']:+.2f} pt; candidate's {test.describe('the baseline', 'the candidate')}): "
        f"{test.outcome.upper()}")
    lat = time_pair(base, cand, rounds, repeats, warmup, sessions, max_latency_regression, log)
    lat["noise"] = max(abs(r["aa_ratio"] - 1.0) for r in lat["sessions"])  # the largest A/A deviation
    lat["outcome"] = ratio_outcome(lat["ratio"], 1.0 + max_latency_regression, lat["noise"])

    from vitrim.export.verdict import gate, make_verdict, merge_gates, raise_for

    gates = [
        gate("regression", "latency", lat["ratio"], 1.0 + max_latency_regression, "<=", EXIT_REGRESSION,
             subject="candidate", unit="ratio to the baseline", outcome=lat["outcome"],
             interval=[lat["ratio"] - 2 * lat["noise"], lat["ratio"] + 2 * lat["noise"]],
             detail=f"paired latency ratio candidate/baseline at batch {lat['batch']}, re-timed round-robin on this "
                    f"machine in {len(lat['sessions'])} session(s); A/A control {lat['aa_ratio']:.3f}: undecided "
                    f"within twice its deviation of the threshold; export.max_latency_regression "
                    f"{max_latency_regression:g}"),
        gate("regression", "accuracy", test.loss_pt, max_acc_regression, "<=", EXIT_REGRESSION,
             subject="candidate", unit="pt lost", outcome=test.outcome, interval=list(test.ci_pt),
             detail=f"test top-1 baseline {acc['baseline_top1']:.2f}% - candidate {acc['candidate_top1']:.2f}% on "
                    f"the same {acc['images']} images, {100 * confidence:g}% interval [{test.ci_pt[0]:+.2f}, "
                    f"{test.ci_pt[1]:+.2f}] pt (McNemar exact: {test.only_a_right} only the baseline gets right, "
                    f"{test.only_b_right} only the candidate); export.max_acc_regression {max_acc_regression:g}"),
    ]
    v = make_verdict(gates, "compare")
    result = {"schema": COMPARE_SCHEMA,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "passed": v["passed"], "outcome": v["outcome"], "exit_code": v["exit_code"],
              "exit_meaning": v["exit_meaning"], "gates": gates,
              "baseline": base.describe(), "candidate": cand.describe(), "signature": base.signature.to_dict(),
              "machine": here, "latency": lat, "accuracy": acc,
              "noisy": lat["outcome"] == INCONCLUSIVE}
    atomic_write_json(out_rd.compare, result)
    merge_gates(out_rd.root, gates, kind=None if out_rd.verdict.is_file() else "compare",
                info={"regression_baseline": str(base.root)})
    seal_manifest(out_rd.root, log=log)  # compare.json and the merged verdict are part of the release now
    table = markdown_table(result)
    log(table)
    if result["noisy"]:
        log(f"[compare] the latency cannot be decided here: the A/A control moved by up to "
            f"{100 * lat['noise']:.1f}% over {len(lat['sessions'])} session(s), and the ratio {lat['ratio']:.3f} lies "
            f"within twice that of the {100 * max_latency_regression:.1f}% threshold; rerun on a quiet runner, or "
            "raise export.compare_sessions / compare_rounds")
    if test.outcome == INCONCLUSIVE:
        log(f"[compare] the accuracy cannot be decided on {acc['images']} images at a {max_acc_regression:g} pt "
            "tolerance: evaluate more images (data.test_limit, export.parity_images) or allow a larger loss")
    # raised for this comparison's own gates: an earlier failure in the merged verdict has its own exit code
    word = "FAILED" if v["outcome"] == FAIL else "INCONCLUSIVE"
    raise_for(v, f"[compare] regression gate {word} against the baseline:\n  " + "\n  ".join(
        f"{g['check']} {g['outcome'].upper()}: {'non-finite' if g['measured'] is None else format(g['measured'], '.4g')} "
        f"{g['op']} {g['threshold']:.4g} ({g['detail']})"
        for g in gates if not g["passed"]) + f"\n  details: {out_rd.compare}, {out_rd.verdict}")
    return result


def compare_from_config(cfg, baseline: str | os.PathLike, candidate: str | os.PathLike,
                        out: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """:func:`compare_releases` on ``cfg``'s test split with ``cfg.export``'s thresholds and timing settings."""
    from vitrim.pipeline.core.data import build_splits, make_loader

    splits = build_splits(cfg.data, model_cfg=cfg.model)
    batch = _recorded_batch(candidate) or cfg.target.batch  # a TensorRT plan takes at most its profile's batch
    loader = make_loader(splits.test, batch, workers=cfg.data.workers)
    e = cfg.export
    return compare_releases(baseline, candidate, loader, max_latency_regression=e.max_latency_regression,
                            max_acc_regression=e.max_acc_regression, rounds=e.compare_rounds,
                            repeats=e.compare_repeats, sessions=e.compare_sessions, warmup=cfg.profile.warmup, out=out,
                            data_preprocessing=splits.preprocessing.to_dict() if splits.preprocessing else None,
                            max_images=e.parity_images, confidence=e.confidence, log=log)


def _recorded_batch(release: str | os.PathLike) -> Optional[int]:
    """The batch a release was made for (its manifest's signature), before the manifest is verified."""
    try:
        return int(json.loads(RunDir(release).manifest.read_text())["device_signature"]["batch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # compare_releases names what is wrong with that release


def compare_config(baseline: str | os.PathLike, candidate: str | os.PathLike, config: str | os.PathLike | None = None,
                   overrides: Optional[list[str]] = None):
    """The config whose test split and thresholds a comparison uses.

    ``config`` when given; else the candidate's ``resolved_config.yaml`` (``vitrim run`` and
    ``vitrim export`` write it beside the release), else the baseline's. ``overrides`` are
    ``--set`` items (e.g. ``export.max_latency_regression=0.05``, ``data.test_limit=2000``).
    """
    from vitrim.pipeline.core.config import load_config

    if config is None:
        for d in (candidate, baseline):
            if RunDir(d).resolved_config.is_file():
                config = RunDir(d).resolved_config
                break
        else:
            raise UserError("compare", f"neither '{candidate}' nor '{baseline}' holds a "
                            f"{RunDir(candidate).resolved_config.name} to take the test data from", "pass --config CONFIG (the config the releases were made with)")
    return load_config(config, overrides or [])
