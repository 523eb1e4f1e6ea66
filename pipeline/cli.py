"""The ``vitrim`` command line: one subcommand per stage, one YAML config.

Every subcommand takes the config path and ``--set section.key=value``
overrides. User errors print one message naming the input and the fix, and exit 2.
A failed gate exits with its own code (3 accuracy/parity, 4 latency, 5 regression;
see :mod:`vitrim.pipeline.core.errors`) after writing ``verdict.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitrim.pipeline.core.errors import EXIT_INTERNAL, EXIT_USER, GateError, Interrupted, UserError, VitrimError
from vitrim.pipeline.core.rundir import RunDir

DEFAULT_CONFIG = "configs/fmnist_cpu.yaml"
NAMES = RunDir("DIR")  # the artifact names the help texts mention


def _cfg(args):
    from vitrim.export.backends import get_backend
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.device import apply_threads

    cfg = load_config(args.config, args.set)
    get_backend(cfg.target.backend, "config")  # the registry knows the engines: an unknown name is a config error
    apply_threads(cfg.runtime.threads)
    return cfg


def _splits(cfg):
    """The data splits, and the preprocessing resolved for them printed (one line, with each field's source)."""
    from vitrim.pipeline.core.data import build_splits

    splits = build_splits(cfg.data, model_cfg=cfg.model)
    print(splits.preprocessing.line())
    print(splits.line())
    return splits


def _check_target(cfg):
    """Fail fast on a target this machine cannot run, before any training or measuring."""
    from vitrim.export.target import Target

    Target.from_config(cfg.target).check_available()


def _out(args, cfg) -> Path:
    """The command's output directory (``--out``, else ``out_dir``), refused before any work when it cannot be
    written (a read-only mount, a missing permission)."""
    from vitrim.pipeline.stages.cache import check_out_dir

    out = Path(args.out or cfg.out_dir)
    check_out_dir(out, "--out" if args.out else "out_dir")
    return out


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    if config_required:
        p.add_argument("config", help="YAML config")
    else:
        p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.budget_fraction=0.4 (repeatable)")


def cmd_train_teacher(args) -> int:
    from vitrim.pipeline.stages.teacher import load_teacher, teacher_path, train_teacher

    from vitrim.pipeline.stages.cache import prepare_cache

    cfg = _cfg(args)
    prepare_cache(cfg, teacher="force" if args.force else "train")  # a read-only cache: refused before training
    if args.force or not teacher_path(cfg).is_file():
        train_teacher(cfg)  # from scratch, or fine-tuned from model.checkpoint
    else:
        from vitrim.pipeline.core.preprocessing import resolve_preprocessing

        print(resolve_preprocessing(cfg.data, cfg.model).line())  # what the cached teacher was trained with
        _, info = load_teacher(cfg)
        if "test_top1" in info:
            print(f"[teacher] test top-1 {info['test_top1']:.2f}% (trained in {info.get('train_s', 0):.0f}s)")
    return 0


def cmd_eval(args) -> int:
    from vitrim.pipeline.core.evaluate import top1
    from vitrim.pipeline.core.slicing import load_compact
    from vitrim.pipeline.stages.teacher import expect_teacher, load_teacher

    cfg = _cfg(args)
    splits = _splits(cfg)
    if args.student:
        model, what = load_compact(args.student), f"student {args.student}"
    else:
        model, _ = load_teacher(cfg, splits, train_if_missing=False)
        what = f"teacher {cfg.model.arch}"
    if args.split == "val":  # the old name of the holdout split
        print("(--split val is the holdout split, held out of train/; an image folder's val/ folder is --split test)")
        args.split = "holdout"
    ds = getattr(splits, "val" if args.split == "holdout" else args.split)
    acc = top1(model, ds, cfg.data.eval_batch_size)
    print(f"{what}: {args.split} top-1 {acc:.2f}% on {len(ds)} images")
    if not args.student and args.split == "test":
        expect_teacher(cfg, model, splits, acc)
    elif not args.student and cfg.model.expected_top1 is not None:
        print(f"(model.expected_top1 is checked on the test split, not on {args.split})")
    return 0


def cmd_slice(args) -> int:
    from vitrim.pipeline.stages.slice import stage_slice

    stage_slice(_cfg(args), args.plan, args.out, teacher_checkpoint=args.teacher)
    return 0


def _teacher_and_spec(cfg, splits=None, train_if_missing=True):
    from vitrim.pipeline.core.models import describe
    from vitrim.pipeline.stages.teacher import load_teacher

    teacher, info = load_teacher(cfg, splits, train_if_missing=train_if_missing)
    return teacher, describe(teacher, cfg.model.arch, cfg.model.kwargs), info


def cmd_profile(args) -> int:
    from vitrim.pipeline.stages.profile import lut_path, stage_profile
    from vitrim.profiling.table import LatencyTable

    for flag in ("plans", "merged", "controls"):  # validate's counts, checked before any teacher or table work
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise UserError("profile", f"--{flag} is {v}", f"use 0 or more (--{flag} 0: none)")
    cfg = _cfg(args)
    if args.action == "show":
        if args.lut:
            path = Path(args.lut)
        else:
            _, spec, _ = _teacher_and_spec(cfg, train_if_missing=False)
            from vitrim.export.target import Target

            path = lut_path(cfg, spec, Target.from_config(cfg.target))
        print(LatencyTable.load(path).summary())
        return 0
    _check_target(cfg)
    from vitrim.pipeline.stages.cache import prepare_cache

    prepare_cache(cfg, lut=True, rebuild_lut=args.rebuild)  # a read-only cache: refused before any measuring
    if args.action == "validate":
        _out(args, cfg)
    teacher, spec, _ = _teacher_and_spec(cfg)
    lut, path = stage_profile(cfg, spec, rebuild=args.rebuild)
    if args.action == "build":
        print(lut.summary())
        print(f"LUT: {path}")
        return 0
    from vitrim.export.target import Target
    from vitrim.pipeline.core.models import canonical_state
    from vitrim.pipeline.search import measured_align
    from vitrim.profiling.validate import validate_lut

    out = Path(args.out or cfg.out_dir)
    n = args.plans if args.plans is not None else cfg.profile.validate_plans
    rep = validate_lut(lut, canonical_state(teacher), Target.from_config(cfg.target), n, out, seed=cfg.profile.seed,
                       warmup=cfg.profile.warmup, repeats=cfg.profile.repeats, rounds=cfg.profile.rounds,
                       align=measured_align(cfg.search, lut, log=lambda s: None).align, merged=args.merged,
                       controls=args.controls)
    print(f"wrote {RunDir(out).lut_validation} and {RunDir(out).lut_validation_plot}")
    return 0 if rep["n_plans"] else 1


def cmd_search(args) -> int:
    from vitrim.pipeline.stages.profile import stage_profile
    from vitrim.pipeline.stages.search import stage_search
    from vitrim.pipeline.stages.teacher import expect_teacher

    from vitrim.pipeline.stages.cache import prepare_cache

    from vitrim.pipeline.search import check_start

    cfg = _cfg(args)
    _check_target(cfg)
    check_start(cfg.search)
    out = _out(args, cfg)
    prepare_cache(cfg, lut=True)  # a read-only cache: refused before any training or measuring
    splits = _splits(cfg)
    teacher, spec, _ = _teacher_and_spec(cfg, splits)
    expect_teacher(cfg, teacher, splits)
    lut, _ = stage_profile(cfg, spec)
    res = stage_search(cfg, teacher, lut, splits, out)
    print(res.plan.summary())
    return 0


def cmd_finetune(args) -> int:
    from vitrim.pipeline.stages.finetune import finetune
    from vitrim.pipeline.core.slicing import load_compact
    from vitrim.pipeline.stages.finetune import check_plan_matches_teacher
    from vitrim.pipeline.stages.teacher import expect_teacher, load_teacher

    cfg = _cfg(args)
    _out(args, cfg)
    splits = _splits(cfg)
    teacher, _ = load_teacher(cfg, splits, train_if_missing=False)
    student = load_compact(args.student)
    check_plan_matches_teacher(student.plan, teacher, cfg)
    expect_teacher(cfg, teacher, splits)
    res = finetune(cfg, teacher, student, student.plan, splits, args.out, resume=args.resume,
                   stop_after=args.stop_after)
    from vitrim.pipeline.core.device import dist_info

    if dist_info()[0] == 0:
        if res.interrupted:
            print(f"stopped after {args.stop_after} epoch(s); continue with --resume")
        else:
            out = RunDir(args.out)
            print(f"fine-tuned in {res.wall_s:.0f}s; wrote {out.student} and {out.plan.name}")
    return 0


def cmd_export(args) -> int:
    from vitrim.pipeline.stages.release import stage_release

    from vitrim.pipeline.core.io import undo_on_fault

    cfg = _cfg(args)
    if args.triton:
        cfg.export.triton = args.triton
    out = _out(args, cfg)
    with undo_on_fault(out, RunDir(out).release_claims()):  # an I/O fault: nothing left that looks like a release
        stage_release(cfg, out, student=args.student, teacher=args.teacher, onnx=args.onnx,
                      build_lut=args.profile, use_lut=not args.no_lut)
        from vitrim.export.triton import triton_from_config

        triton_from_config(cfg, out)  # export.triton / --triton: the release as a Triton model repository
        from vitrim.export.manifest import seal_manifest

        seal_manifest(out)  # a Triton repository inside the release is listed too
    return 0


def cmd_verify_manifest(args) -> int:
    from vitrim.export.manifest import verify_manifest

    m = verify_manifest(args.dir, pubkey=args.pubkey)
    print(f"manifest OK: {len(m['files'])} files verified in {args.dir}"
          + (f"; signature OK under {args.pubkey}" if args.pubkey else ""))
    return 0


def cmd_sign(args) -> int:
    from vitrim.export.manifest import sign_manifest, verify_manifest

    sig = sign_manifest(args.dir, args.key)
    print(f"signed {RunDir(args.dir).manifest} -> {sig}")
    if args.pubkey:  # check the pair before the release leaves this machine
        verify_manifest(args.dir, pubkey=args.pubkey)
        print(f"signature verifies under {args.pubkey}")
    return 0


def cmd_run(args) -> int:
    from vitrim.pipeline.stages.run import run_pipeline

    cfg = _cfg(args)
    run_pipeline(cfg)
    return 0


def cmd_curve(args) -> int:
    from vitrim.pipeline.stages.curve import (collect_curve, continue_config, curve_chains, curve_points, run_curve,
                                              run_point)

    cfg = _cfg(args)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise UserError("curve", f"--budgets '{args.budgets}' is not a comma-separated list of fractions",
                        "use e.g. --budgets 0.8,0.6,0.5,0.4") from None
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise UserError("curve", f"--budgets {budgets} must be fractions in (0, 1]", "use e.g. --budgets 0.8,0.6,0.5,0.4")
    baselines = [b for b in args.baselines.split(",") if b]
    from vitrim.pipeline.core.config import STRATEGIES

    for b in baselines:
        if b not in STRATEGIES:
            raise UserError("curve", f"unknown baseline '{b}'", f"use one of {', '.join(STRATEGIES)}")
    if args.seeds < 1:
        raise UserError("curve", f"--seeds {args.seeds}", "use 1 or more seeds per point")
    if args.collect:
        cfg.out_dir = args.collect
    curves = [c for c in args.curves.split(",") if c]
    cont = continue_config(args.config, args.set, args.continue_set)
    points = curve_points(cfg, budgets, baselines, args.seeds, curves)
    chains = curve_chains(points)
    if args.list:
        chain_of = {k: j for j, ks in enumerate(chains) for k in ks}
        for p in points:
            after = (f" (continues from point {p.after}, or the nearest point above it that reaches its budget: "
                     f"{', '.join(p.names())})" if p.after is not None else "")
            print(f"{p.index}\t{p.label()}{after}\tchain {chain_of[p.index]}")
        print(f"chains: {len(chains)} (--chain 0..{len(chains) - 1}: one job each, its points in order)")
        return 0
    if args.chain is not None:
        if not 0 <= args.chain < len(chains):
            raise UserError("curve", f"--chain {args.chain}: this curve has chains 0..{len(chains) - 1}",
                            "list them with `vitrim curve CONFIG --budgets ... --list` (the same options)")
        for k in chains[args.chain]:
            rec = run_point(cfg, points, k, cont=cont)
            print(f"[curve] point {k}: {rec['status']}")
        return 0
    if args.point is not None:
        rec = run_point(cfg, points, args.point, cont=cont)
        print(f"[curve] point {args.point}: {rec['status']}")
    elif args.collect is not None:
        collect_curve(cfg, points)
    else:
        run_curve(cfg, budgets, baselines, args.seeds, curves, cont=cont)
    return 0


def cmd_compare(args) -> int:
    from vitrim.export.compare import compare_config
    from vitrim.pipeline.stages.compare import stage_compare

    cfg = compare_config(args.baseline, args.candidate, args.config, args.set)
    stage_compare(cfg, args.baseline, args.candidate, out=args.out)
    return 0  # a regression raises RegressionGateError: exit 5, after compare.json and verdict.json


def cmd_targets(args) -> int:
    from vitrim.export.target import format_targets, machine_targets

    info = machine_targets()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
    else:
        print(format_targets(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitrim", description="Make Vision Transformers fast on a chosen target: "
                                "profile -> search -> slice -> fine-tune -> export & verify.")
    from vitrim import __version__

    p.add_argument("--version", action="version", version=f"vitrim {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    from vitrim.export.backends import BACKENDS

    s = sub.add_parser("targets", help="the backends and precisions this machine can run (of "
                       f"{', '.join(BACKENDS)}), their engine versions, the CPU features that matter, the GPU")
    s.add_argument("--json", action="store_true", help="print it as JSON")
    s.set_defaults(fn=cmd_targets)

    s = sub.add_parser("run", help="the whole pipeline from one YAML: profile, search, slice, fine-tune, export, report")
    _common(s, config_required=True)
    s.set_defaults(fn=cmd_run)

    from vitrim.pipeline.stages.curve import DEFAULT_CURVES

    s = sub.add_parser("curve", help="latency-accuracy curve: the pipeline per budget (and seed), plus baselines, "
                       "re-timed together in one session")
    _common(s, config_required=True)
    s.add_argument("--budgets", default="0.8,0.6,0.5,0.4", help="latency fractions (default 0.8,0.6,0.5,0.4)")
    s.add_argument("--baselines", default="uniform", help="comma-separated strategies to compare (default uniform)")
    s.add_argument("--seeds", type=int, default=1, help="seeds per point: search.seed + k and finetune.seed + k for "
                   "k < N (default 1); the plot shows the mean and the min-max range, the curve's report which "
                   f"differences between methods exceed it ({NAMES.curve_report.name})")
    s.add_argument("--curves", default=",".join(DEFAULT_CURVES), metavar="LIST",
                   help="which curves of each strategy, comma-separated: independent (every budget from the "
                   "teacher), progressive (budgets high to low, each search continuing the previous budget's plan and "
                   "adapted weights), progressive-ft (continuing its fine-tuned student); several share their first "
                   f"point and are compared in one session (default {','.join(DEFAULT_CURVES)})")
    s.add_argument("--continue-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a finetune.* key or a search recipe key (steps, kd_iters, measured_rounds, ...: "
                   "docs/curves.md) for the points that continue from another (a "
                   "progressive curve's points below its first), e.g. --continue-set finetune.epochs=1: a shorter "
                   "fine-tune for a point that starts from a fine-tuned student (repeatable)")
    jobs = s.add_mutually_exclusive_group()  # one of: list the points, run one, assemble the curve
    jobs.add_argument("--list", action="store_true", help="print the points (index, strategy, budget, seed) and exit")
    jobs.add_argument("--point", type=int, metavar="K", help="run only point K of --list into the curve's directory "
                   "(one job of a job array); the curve is assembled by --collect")
    jobs.add_argument("--chain", type=int, metavar="J", help="run chain J of --list (a point and the points that "
                      "continue from it, in order): one job of a job array for a progressive curve")
    jobs.add_argument("--collect", nargs="?", const="", metavar="DIR", help="re-time the finished points with the "
                   "teacher in one session and write "
                   f"{NAMES.curve_csv.name}, {NAMES.curve_plot.name} and {NAMES.curve_report.name} (DIR: the curve's "
                   "directory, default out_dir); a point not finished exits 2 naming it")
    s.set_defaults(fn=cmd_curve)

    s = sub.add_parser("train-teacher", help="train the teacher on the config's data (from scratch, or from "
                       "model.checkpoint to adapt it to your classes); reuses a cached one unless --force")
    _common(s)
    s.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    s.set_defaults(fn=cmd_train_teacher)

    s = sub.add_parser("eval", help="print top-1 of the teacher (or a student) on a split")
    _common(s)
    s.add_argument("--split", choices=["train", "holdout", "test", "val"], default="test",
                   help="holdout: held out of the training images (data.val_size); test: Fashion-MNIST's test set or "
                   "an image folder's val/ folder (val: the holdout, its old name)")
    s.add_argument("--student", help=f"a student directory ({NAMES.plan.name} + {NAMES.student.name})")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("slice", help="physically slice the teacher with a plan into a smaller dense model")
    _common(s)
    s.add_argument("--teacher", help="teacher checkpoint (.safetensors/.pth); default: the config's teacher")
    s.add_argument("--plan", required=True, help=f"the plan ({NAMES.plan.name})")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(fn=cmd_slice)

    s = sub.add_parser("profile", help="build, validate or show the latency lookup table (LUT) for the target")
    s.add_argument("action", choices=["build", "validate", "show"])
    _common(s)
    s.add_argument("--rebuild", action="store_true", help="measure again even if a matching LUT exists")
    s.add_argument("--plans", type=int, help="validate: number of held-out plans, stratified over 30-95%% of the "
                   "teacher's predicted latency and timed with the teacher (default profile.validate_plans)")
    s.add_argument("--merged", type=int, help="validate: number of further held-out plans with one or two token "
                   "merges each (default: a third of --plans when the LUT has a token axis, else 0)")
    s.add_argument("--controls", type=int, default=3, help="validate: number of the build's own unmerged calibration "
                   "plans (at most as many as it has) timed again with the held-out plans, an A/A control of the "
                   "measurement (default 3; 0: none)")
    s.add_argument("--out", help="validate: output directory (default out_dir)")
    s.add_argument("--lut", help="show: a LUT file")
    s.set_defaults(fn=cmd_profile)

    s = sub.add_parser("search", help=f"latency-aware structural search (writes {NAMES.plan.name})")
    _common(s)
    s.add_argument("--out", help="output directory (default out_dir)")
    s.set_defaults(fn=cmd_search)

    s = sub.add_parser("finetune", help="KD fine-tune a sliced student (single process or under torchrun)")
    _common(s)
    s.add_argument("--student", required=True, help=f"directory with {NAMES.plan.name} + {NAMES.student.name} "
                   "(from slice)")
    s.add_argument("--out", required=True, help="output directory (checkpoints in OUT/finetune/)")
    s.add_argument("--resume", action="store_true", help="continue from "
                   f"{RunDir('OUT').finetune_dir.checkpoint.as_posix()}")
    s.add_argument("--stop-after", type=int, help="stop after N epochs in this invocation (resume later)")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("export", help="export ONNX, build the engine, gate on parity, measure, write "
                       f"{NAMES.manifest.name}")
    _common(s)
    s.add_argument("--student", help=f"student directory ({NAMES.plan.name} + {NAMES.student.name})")
    s.add_argument("--teacher", action="store_true", help="export the (unpruned) teacher instead")
    s.add_argument("--out", help="output directory (default out_dir)")
    s.add_argument("--onnx", help="release this existing ONNX (e.g. exported outside vitrim) instead of exporting; "
                   "the config's model (model.checkpoint) is the parity reference")
    s.add_argument("--profile", action="store_true", help="build the LUT if none matches (for the predicted latency)")
    s.add_argument("--no-lut", action="store_true", help="do not look up a LUT for the predicted latency")
    s.add_argument("--triton", metavar="DIR", help="also lay out a Triton model repository (export.triton): "
                   "DIR/NAME/config.pbtxt and, in DIR/NAME/1/, the ONNX graph (ORT-CPU) or the TensorRT plan; NAME "
                   "is export.triton_name or the config's name")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("verify-manifest", help="re-check the sha256 of every artifact in "
                       f"{NAMES.manifest.as_posix()}, that every path stays inside DIR and that no model file "
                       "in DIR is left out; with --pubkey, the Ed25519 signature too")
    s.add_argument("dir")
    s.add_argument("--pubkey", help=f"Ed25519 public key (PEM): also require a valid {NAMES.manifest_signature.name}")
    s.set_defaults(fn=cmd_verify_manifest)

    s = sub.add_parser("sign", help=f"verify DIR, then write {NAMES.manifest_signature.as_posix()}, a detached "
                       "Ed25519 signature of its manifest (needs the 'sign' extra: cryptography)")
    s.add_argument("dir")
    s.add_argument("--key", required=True, help="Ed25519 private key (PEM; a passphrase from VITRIM_KEY_PASSWORD)")
    s.add_argument("--pubkey", help="also check the new signature with this public key (PEM)")
    s.set_defaults(fn=cmd_sign)

    s = sub.add_parser("compare", help="regression gate: re-time the BASELINE and CANDIDATE releases side by side on "
                       "this machine and re-evaluate both on the test split; exit 5 when the candidate is slower by "
                       "more than export.max_latency_regression (3%%) or loses more than export.max_acc_regression "
                       f"(0.3 pt) of top-1; prints a Markdown table, writes {NAMES.compare.name} and "
                       f"{NAMES.verdict.name}")
    s.add_argument("baseline", help="the last release's directory (written by vitrim run or vitrim export)")
    s.add_argument("candidate", help="the new release's directory")
    s.add_argument("--config", help="the config whose test split and export.* thresholds are used (default: "
                   f"CANDIDATE/{NAMES.resolved_config.name}, else BASELINE's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set export.max_latency_regression=0.05 (repeatable)")
    s.add_argument("--out", help=f"where {NAMES.compare.name} and {NAMES.verdict.name} go (default: CANDIDATE)")
    s.set_defaults(fn=cmd_compare)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"vitrim: error: {e}", file=sys.stderr)
        return EXIT_USER
    except OSError as e:  # an I/O fault a write outside vitrim.pipeline.core.io met: the same exit 2
        from vitrim.pipeline.core.io import FAULT_ERRNOS, io_fault

        if e.errno not in FAULT_ERRNOS or not e.filename:
            raise
        print(f"vitrim: error: {io_fault(e.filename, e)}", file=sys.stderr)
        return EXIT_USER
    except GateError as e:  # a release gate failed: verdict.json is on disk; the class names the exit code
        print(f"vitrim: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # SIGTERM/SIGINT inside a training loop: a checkpoint was saved
        import os

        if int(os.environ.get("RANK", 0)) == 0:
            print(f"vitrim: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except VitrimError as e:  # InternalError: a bug in vitrim, never a verdict on the model (so not 3)
        import traceback

        traceback.print_exc()
        print(f"vitrim: internal error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print("vitrim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
