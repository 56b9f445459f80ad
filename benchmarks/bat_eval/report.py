"""The evaluation's report: report.md (tables), summary.json, and PNG plots."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .matching import METHODS

COLORS = {
    "eta": "tab:blue",
    "bat-eta": "tab:cyan",
    "epsilon": "tab:red",
    "bat-epsilon": "tab:orange",
    "untruncated": "gray",
}


def fmt(stat: dict[str, float], digits: int = 3) -> str:
    if stat["n"] == 0 or not math.isfinite(stat["mean"]):
        return "n/a"
    ci = "" if not math.isfinite(stat["ci95"]) else f" ± {stat['ci95']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{ci}"


def plot_rejection(out: str, results: dict, settings) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for method in METHODS:
            grid = result["matching"]["grids"][method]
            ax.plot(
                grid["parameters"],
                grid["shares"],
                "o-" if "bat" in method else "s--",
                color=COLORS[method],
                label=method,
                markersize=3,
            )
        for level in settings.levels:
            ax.axhline(level, color="lightgray", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("parameter (eps)")
        ax.set_ylabel("share of human next tokens rejected")
        ax.set_title(f"{name}: {result['matching']['positions']} teacher-forced tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "rejection_share.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality(out: str, results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("mauve", "MAUVE (higher: closer to human)"),
        ("distinct_2", "distinct-2"),
        ("repetition_4", "repetition (4-grams)"),
    )
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(15, 3.6 * len(results)), squeeze=False)
    for row, (name, result) in zip(axes, results.items()):
        summary = result["quality"]["summary"]
        keys = list(summary)
        for ax, (metric, label) in zip(row, metrics):
            means = [summary[k][metric]["mean"] for k in keys]
            errs = [0 if not math.isfinite(summary[k][metric]["ci95"]) else summary[k][metric]["ci95"] for k in keys]
            ax.bar(
                range(len(keys)), means, yerr=errs, capsize=3, color=[COLORS.get(k.split("@")[0], "gray") for k in keys]
            )
            if metric != "mauve":
                ax.axhline(result["quality"]["human"][metric], color="black", lw=1, ls=":", label="human")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{name}: {label}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "quality.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled markdown table (nothing when there are no rows)."""
    if not rows:
        return []
    return ["", title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def kept_summary(kept: dict) -> dict[str, Any]:
    out = {}
    for method, data in kept.items():
        steps = data["steps"]
        if not steps:
            continue
        out[method] = {
            "parameter": data["parameter"],
            "steps": len(steps),
            "median_threshold_size": float(np.median([s["threshold_size"] for s in steps])),
            "median_bat_size": float(np.median([s["bat_size"] for s in steps])),
            "mean_threshold_mass": float(np.mean([s["threshold_mass"] for s in steps])),
            "mean_bat_mass": float(np.mean([s["bat_mass"] for s in steps])),
            "mean_undecided_mass": float(np.mean([s["undecided_mass"] for s in steps])),
            "steps_with_extra_tokens": float(np.mean([s["accepted_below_tau"] > 0 for s in steps])),
        }
    return out


def examples(runs: list[dict], count: int = 3) -> list[dict]:
    """Continuations with the tokens BAT took below tau marked [[like this]]."""
    picked = []
    for run in runs:
        if not run["sampler"].startswith("bat-") or run["seed"] != runs[0]["seed"]:
            continue
        for row in run["rows"]:
            if row.get("below_tau") and len(picked) < count * 2:
                picked.append(
                    {
                        "sampler": run["sampler"],
                        "parameter": run["parameter"],
                        "passage": row["passage"],
                        "text": row["marked"],
                    }
                )
    return picked


def write_report(out: str, settings, results: dict) -> None:
    from .pipeline import write_json

    lines = ["# BAT against threshold sampling: evaluation results", "", f"Settings: `{settings.as_dict()}`", ""]
    summary: dict[str, Any] = {"settings": settings.as_dict(), "models": {}}
    for name, result in results.items():
        matched = result["matching"]
        lines += [
            f"## {name}",
            "",
            f"{matched['positions']} teacher-forced human tokens ({matched['argmax_share']:.0%} were the argmax, "
            f"median p_hat {matched['median_p']:.3f}); {matched['bat_decisions']} exact BAT decisions, "
            f"{matched['bat_fallbacks']} found no certificate (unproven: counted as rejects), "
            f"{matched['bat_seconds']:.0f} s.",
            "",
            "| target share | " + " | ".join(METHODS) + " |",
            "|---|" + "---|" * len(METHODS),
        ]
        for level, row in matched["matches"].items():
            cells = []
            for m in METHODS:
                r = row[m]
                note = "" if r["reachable"] else " (not reached)"
                fb = f", {r['fallback_share']:.1%} unproven" if r["fallback_share"] else ""
                cells.append(f"{r['parameter']:.3g} ({r['share']:.1%}{fb}){note}")
            lines.append(f"| {float(level):.0%} | " + " | ".join(cells) + " |")
        q = result["quality"]
        keys = list(q["summary"])
        cols = ("mauve", "mauve_pooled", "distinct_1", "distinct_2", "distinct_3", "repetition_4", "length_tokens")
        lines += [
            "",
            "Quality over seeds (mean ± 95% CI half-width, Student t):",
            "",
            "| sampler | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(fmt(q["summary"][k][c]) for c in cols) + " |")
        lines.append("| human | n/a | n/a | " + " | ".join(f"{q['human'][c]:.3f}" for c in cols[2:6]) + " | n/a |")
        kept = kept_summary(matched.get("kept", {}))
        lines += table(
            "Accepted sets per step at the same tau (BAT's matched parameter):",
            [
                "method",
                "steps",
                "median size: threshold / BAT",
                "mean mass: threshold / BAT",
                "undecided mass",
                "steps where BAT adds tokens",
            ],
            [
                [
                    f"{m} ({k['parameter']:.3g})",
                    str(k["steps"]),
                    f"{k['median_threshold_size']:.0f} / {k['median_bat_size']:.0f}",
                    f"{k['mean_threshold_mass']:.3f} / {k['mean_bat_mass']:.3f}",
                    f"{k['mean_undecided_mass']:.3f}",
                    f"{k['steps_with_extra_tokens']:.0%}",
                ]
                for m, k in kept.items()
            ],
        )
        audit = matched.get("audit", {})
        lines += table(
            "Audit of BAT's rejects (sample re-decided by the exact LP with a longer budget):",
            ["method", "rejects at the level", "sampled", "exact accept", "exact reject", "undecided", "budget"],
            [
                [
                    f"{m} ({a['parameter']:.3g})",
                    str(a["rejects"]),
                    str(a["sampled"]),
                    str(a["accept"]),
                    str(a["reject"]),
                    str(a["undecided"]),
                    f"{a['budget']:g} s",
                ]
                for m, a in audit.items()
            ],
        )
        picked = examples(result["runs"])
        if picked:
            lines += ["", "Examples (tokens BAT took below tau in [[brackets]]):", ""]
            lines += [f"- {e['sampler']} ({e['parameter']:.3g}), {e['passage']}: {e['text']!r}" for e in picked]
        lines.append("")
        summary["models"][name] = {
            "matches": matched["matches"],
            "quality": q["summary"],
            "human": q["human"],
            "kept": kept,
            "audit": audit,
            "examples": picked,
        }
    plots = [plot_rejection(out, results, settings), plot_quality(out, results)]
    lines += ["Plots: " + ", ".join(os.path.basename(p) for p in plots), ""]
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(lines))
    write_json(os.path.join(out, "summary.json"), summary)
