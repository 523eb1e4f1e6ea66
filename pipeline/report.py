"""What a run reports: ``summary.json``, ``report.md`` and the ``widths.png`` plot.

The stages call these functions with what they measured; nothing here calls a
stage, and every file name comes from the run's
:class:`~vitrim.pipeline.core.rundir.RunDir`.
"""
from __future__ import annotations

import json

from vitrim.pipeline.core.config import pct
from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.search.groups import WIDTH_DIMS, full_widths


def plot_widths(plan: Plan, path, title: str = "") -> None:
    """NViT's 'parameter redistribution' picture: kept fraction per block and dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vitrim.pipeline.core.io import atomic_save

    s = plan.spec
    full = full_widths(s)
    depth = len(plan.blocks)
    x = np.arange(depth)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    w = 0.2
    for k, dim in enumerate(WIDTH_DIMS):
        vals = [len(getattr(b, dim)) / full[dim] if b.keep else 0.0 for b in plan.blocks]
        ax.bar(x + (k - 1.5) * w, vals, w, label=f"{dim} (of {full[dim]})")
    for i, b in enumerate(plan.blocks):
        if not b.keep:
            ax.text(i, 0.02, "skipped", rotation=90, ha="center", va="bottom", fontsize=8)
    if plan.merges:  # token merges: the token count entering every block, on its own axis
        ax2 = ax.twinx()
        ax2.step(x, plan.block_tokens(), where="mid", color="k", lw=1.2, label="tokens")
        ax2.set_ylabel("tokens entering the block")
        ax2.set_ylim(0, plan.num_tokens * 1.05)
        for i, t in plan.merges.items():
            ax2.annotate(f"merge {t}", (i - 0.5, plan.block_tokens()[i]), fontsize=7, rotation=90, va="bottom")
    ax.set_xticks(x, [str(i) for i in range(depth)])
    ax.set_xlabel("block")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"kept widths per block (embed {plan.embed_dim}/{s['embed_dim']})", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def make_summary(cfg, spec, plan, lut, teacher_acc, teacher_exp, student_exp, rd: RunDir, timings: dict) -> dict:
    """The run's summary: teacher and student side by side, the search's log, the stage times."""
    full = Plan.full(spec)
    t_ms, s_ms = teacher_exp["latency"]["median_ms"], student_exp["latency"]["median_ms"]
    s_acc = student_exp["parity"]["torch_top1"]
    log_path = rd.search_dir.search_log
    search_log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    return {
        "name": cfg.name, "signature": lut.signature.to_dict(), "budget": search_log.get("budget_desc"),
        "strategy": cfg.search.strategy,
        "teacher": {"params": full.num_params(), "macs": full.macs(), "predicted_ms": lut.predict(full),
                    "measured_ms": t_ms, "p90_ms": teacher_exp["latency"]["p90_ms"], "top1": teacher_acc,
                    "engine_top1": teacher_exp["parity"]["engine_top1"],
                    "parity_agreement": teacher_exp["parity"]["top1_agreement"]},
        "student": {"params": plan.num_params(), "macs": plan.macs(), "predicted_ms": lut.predict(plan),
                    "measured_ms": s_ms, "p90_ms": student_exp["latency"]["p90_ms"], "top1": s_acc,
                    "engine_top1": student_exp["parity"]["engine_top1"],
                    "parity_agreement": student_exp["parity"]["top1_agreement"],
                    "parity_max_absdiff": max(o["max_absdiff"] for o in student_exp["parity"]["outputs"].values())},
        "speedup": t_ms / s_ms, "delta_top1": s_acc - teacher_acc, "timings": timings,
        "search_log": search_log.get("steps", []), "plan_summary": plan.summary(),
    }


RELEASE_SESSION = "the release re-timing (teacher and student round-robin in one session at the end of the run)"
RELEASE_SESSION_APART = "the releases' own timings (teacher and student timed apart)"


def add_measured_budget(summary: dict, rd: RunDir, same) -> str | None:
    """Put the closed loop's rounds and the delivered engine's measured ratio into the run summary.

    Returns a warning for the console when the delivered engine's ratio leaves the tolerance that the loop's
    chosen round met (the two come from different timing sessions; the report says so too), else None.
    """
    p = rd.search_dir.measured_budget
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    if same is not None:  # teacher and delivered student re-timed round-robin at the end of the run
        ratio = same[1].median_ms / same[0].median_ms
    else:
        ratio = summary["student"]["measured_ms"] / summary["teacher"]["measured_ms"]
    session = RELEASE_SESSION if same is not None else RELEASE_SESSION_APART
    m["delivered"] = {"measured_ratio": ratio, "within": abs(ratio / m["requested"] - 1.0) <= m["tolerance"],
                      "session": session}
    summary["measured_budget"] = m
    if m["delivered"]["within"] or not m.get("rounds"):
        return None
    k = m.get("chosen_round", len(m["rounds"]) - 1)
    r = m["rounds"][k]
    if abs(r["measured_ratio"] / m["requested"] - 1.0) > m["tolerance"]:
        return (f"[run] WARNING: the delivered engine measured {ratio:.1%} of the teacher in {session}, "
                f"{100 * (ratio / m['requested'] - 1):+.1f}% off the requested {m['requested']:.1%}, outside "
                f"+-{pct(m['tolerance'])}; the closed loop did not meet it either (round {k}: {r['measured_ratio']:.1%})")
    return (f"[run] WARNING: the closed loop's round {k} measured {r['measured_ratio']:.1%} of the teacher in its own "
            f"session during the search, within +-{pct(m['tolerance'])} of the requested {m['requested']:.1%}; "
            f"{session} measured {ratio:.1%} ({100 * (ratio / m['requested'] - 1):+.1f}%), outside it. The machine's "
            f"timing drifted between the two sessions (the report's 'Latency budget, measured'); rerun on a quieter "
            f"machine, or widen search.measured_tolerance")


def prediction_line(s: dict) -> str | None:
    """The LUT's prediction error as a ratio to the teacher: predicted and measured each from one session.

    None when the summary has no teacher and student prediction (a LUT that could not price the plan).
    """
    t, st = s["teacher"], s["student"]
    if not (t.get("predicted_ms") and st.get("predicted_ms") and t.get("measured_ms") and st.get("measured_ms")):
        return None
    pred = st["predicted_ms"] / t["predicted_ms"]
    meas = st["measured_ms"] / t["measured_ms"]
    session = "one session at the end of the run" if s.get("latency_protocol") else "the releases' own timings"
    return (f"LUT prediction: student {pred:.1%} of the teacher (predicted, one LUT session), measured {meas:.1%} "
            f"({session}): error {100 * (pred / meas - 1):+.1f}% (predicted / measured - 1; + means the LUT expected "
            f"a slower student than measured, - a faster one)")


def measured_budget_lines(s: dict) -> list[str]:
    """The report's "Latency budget, measured" section, from the run summary."""
    m = s.get("measured_budget")
    if not m:
        return []
    lines = ["", "## Latency budget, measured", ""]
    a = m.get("anchor") or {}
    if a:
        lines.append(f"The budget {a['budget_ms']:.3f} ms was anchored on the teacher measured on the target when the "
                     f"run started ({a['teacher_measured_ms']:.3f} ms), i.e. {a['fraction']:.1%} of the teacher; LUT "
                     f"milliseconds from the build were not used for it.  ")
    lines.append(f"Requested: {m['requested']:.1%} of the teacher's latency; tolerance +-{pct(m['tolerance'])} "
                 f"(`search.measured_tolerance`). Each round exports the plan and times it round-robin with the "
                 f"teacher in one session.")
    lines += ["", "| round | LUT budget | predicted | measured | miss | corrected budget |", "|---:|---:|---:|---:|---:|---:|"]
    for r in m["rounds"]:
        cb = "" if r["corrected_budget_ratio"] is None else (f"{r['corrected_budget_ratio']:.1%}"
                                                              + (f" ({r['rule']})" if r.get("rule") else ""))
        lines.append(f"| {r['round']} | {r['budget_ratio']:.1%} | {r['predicted_ratio']:.1%} | {r['measured_ratio']:.1%} "
                     f"| {r['miss_pct']:+.1f}% | {cb} |")
    if not m.get("converged", True):
        k = m.get("chosen_round", len(m["rounds"]) - 1)
        c = m["rounds"][k]
        lines += ["", f"**The closed loop did not converge**: no measured plan came within +-{pct(m['tolerance'])} of "
                  f"the requested {m['requested']:.1%} in {len(m['rounds'])} measurements. The plan kept is round "
                  f"{k}'s, the closest measured ({c['measured_ratio']:.1%} of the teacher, {c['miss_pct']:+.1f}%); "
                  "raise `search.measured_rounds` or `search.measured_tolerance` (or `profile.repeats` on a "
                  "noisy machine)."]
    d = m.get("delivered")
    if d:
        lines += ["", f"**Delivered engine: {d['measured_ratio']:.1%} of the teacher, measured in "
                  f"{d.get('session', 'the release timing')} "
                  f"({100 * (d['measured_ratio'] / m['requested'] - 1):+.1f}% off the requested {m['requested']:.1%}; "
                  f"{'within' if d['within'] else 'outside'} +-{pct(m['tolerance'])}).** The rounds above were each "
                  "timed in their own session during the search; milliseconds drift between sessions on a shared "
                  "machine, ratios much less."]
    return lines


def preprocessing_lines(s: dict, rd: RunDir) -> list[str]:
    """The report's preprocessing section (issue 21): what the teacher, the student and the engine expect."""
    p = s.get("preprocessing")
    if not p:
        return []
    lines = ["## Preprocessing", "",
             f"Every figure above was measured with this input; the engine expects it too (also in "
             f"`{rd.manifest.name}`).",
             "", "| field | value | from |", "|---|---|---|"]
    for k in ("input_size", "resize", "crop_pct", "crop_mode", "interpolation", "mean", "std", "channels", "layout",
              "dtype", "value_range"):
        v = p.get(k)
        v = "x".join(str(a) for a in v) if k in ("input_size", "resize") and v else v
        src = p["sources"].get(k, "derived" if k in ("resize", "channels") else "vitrim")
        lines.append(f"| {k} | `{v}` | {src} |")
    lines += ["", "Steps: " + "; ".join(p["steps"]) + "."]
    if s.get("expected_top1") is not None:
        lines.append(f"The teacher's test top-1 ({s['teacher']['top1']:.2f}%) was checked against "
                     f"model.expected_top1 = {s['expected_top1']:g}%.")
    return lines + [""]


def recovery_lines(s: dict, rd: RunDir) -> list[str]:
    """The report's int8-recovery paragraph (issue 16), when the target is int8."""
    if s["signature"].get("precision") != "int8":
        return []
    r = s.get("int8_recovery")
    if not r:
        return ["## int8 recovery", "", "Not needed: the int8 engine passed the gate as quantized.", ""]
    b = r["before"]
    return ["## int8 recovery", "",
            f"The first int8 engine failed the gate (engine top-1 {b['engine_top1']:.2f}% against "
            f"{b['torch_top1']:.2f}% in fp32 torch): {'; '.join(b['failures'])}. {r['steps']} KD steps with int8 "
            f"fake-quant on {r['linear_layers']} Linear layers ({r['wall_s']:.0f} s) made the released engine "
            f"(weights in `{rd.int8_recovery_dir.root.name}/`).", ""]


def write_report(rd: RunDir, s: dict) -> None:
    """``report.md``: the run's summary in Markdown."""
    t, st = s["teacher"], s["student"]
    sig = s["signature"]
    rows = [
        ("params (M)", f"{t['params'] / 1e6:.3f}", f"{st['params'] / 1e6:.3f}"),
        ("MACs / image (M)", f"{t['macs'] / 1e6:.1f}", f"{st['macs'] / 1e6:.1f}"),
        ("predicted latency (ms, LUT)", f"{t['predicted_ms']:.3f}", f"{st['predicted_ms']:.3f}"),
        ("measured latency (ms, median)", f"{t['measured_ms']:.3f}", f"{st['measured_ms']:.3f}"),
        ("measured latency (ms, p90)", f"{t['p90_ms']:.3f}", f"{st['p90_ms']:.3f}"),
        ("test top-1 (%, torch)", f"{t['top1']:.2f}", f"{st['top1']:.2f}"),
        ("test top-1 (%, engine)", f"{t['engine_top1']:.2f}", f"{st['engine_top1']:.2f}"),
        ("engine/torch top-1 agreement (%)", f"{100 * t['parity_agreement']:.2f}", f"{100 * st['parity_agreement']:.2f}"),
    ]
    lines = [f"# vitrim report: {s['name']}", "",
             f"Target: `{sig['backend']}/{sig['precision']}` on **{sig['device']}** ({sig['engine_version']}), "
             f"batch {sig['batch']}, {sig['tokens']} tokens, {sig['threads']} threads.  ",
             f"Strategy `{s['strategy']}`, budget {s['budget']}.", "",
             f"**Measured speedup {s['speedup']:.2f}x at {s['delta_top1']:+.2f} pt top-1.**", "",
             "| | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "## Where the widths survived", "",
              f"![widths]({rd.search_dir.widths_plot.relative_to(rd.root).as_posix()})", "",
              "```", s["plan_summary"], "```", "", "## Search log", "",
              "| step | predicted (ms) | holdout top-1 after short KD (%) | removed groups |", "|---:|---:|---:|---|"]
    for r in s["search_log"]:
        acc = "" if r.get("val_top1") is None else f"{r['val_top1']:.2f}"
        lines.append(f"| {r['step']} | {r['cost']:.3f} | {acc} | {r.get('removed') or ''} |")
    from vitrim.export.backends import get_backend

    names = {k: getattr(rd, k).name for k in ("onnx", "student", "plan", "lut", "parity", "manifest",
                                               "resolved_config")}
    pline = prediction_line(s)
    lines += ["", "## Predicted vs measured", "",
              *([pline + ".", ""] if pline else []),
              f"In milliseconds, from different sessions (the LUT's build and this run's timing; absolute times drift "
              f"between sessions on a shared machine, so they are not compared): teacher predicted "
              f"{t['predicted_ms']:.3f} ms, measured {t['measured_ms']:.3f} ms; student predicted "
              f"{st['predicted_ms']:.3f} ms, measured {st['measured_ms']:.3f} ms.", "",
              *measured_budget_lines(s), "",  # issue 14
              *recovery_lines(s, rd),
              *preprocessing_lines(s, rd),
              "## Stage times (s)", "", "| " + " | ".join(s["timings"]) + " |",
              "|" + "---:|" * len(s["timings"]), "| " + " | ".join(str(v) for v in s["timings"].values()) + " |", "",
              f"Artifacts: `{names['onnx']}`, `{get_backend(sig['backend']).engine_path(rd).name}` (engine), `{names['student']}`, "
              f"`{names['plan']}`, `{names['lut']}`, `{names['parity']}`, `{names['manifest']}` (verify with "
              f"`vitrim verify-manifest`), `{names['resolved_config']}`."]
    atomic_write_text(rd.report, "\n".join(lines) + "\n")


def write_summary(rd: RunDir, summary: dict) -> None:
    """``summary.json`` and ``report.md``."""
    atomic_write_json(rd.summary, summary)
    write_report(rd, summary)
