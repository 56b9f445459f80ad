"""The evaluation's stages, each resumable: its JSON file is written atomically when the stage is done,
and a re-run skips every stage whose file is there (per model, per generation run)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import bat_core
from bat_core import BatError, ThresholdRule

from . import generation, matching, quality
from .human_text import load_passages


@dataclass
class Settings:
    models: tuple[str, ...] = ("smollm2", "gemma3")
    passages: int = 40
    prefix_words: int = 16
    positions: int = 24  # teacher-forced continuation tokens per passage
    levels: tuple[float, ...] = (0.05, 0.10, 0.25)  # human rejection shares to match
    generate_levels: tuple[float, ...] = (0.10,)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_tokens: int = 32
    # LP seconds per BAT decision, in matching and in generation alike. 0: certificate search only, as in
    # the llama.cpp adapter's default: no clock in a decision, so results do not depend on machine load
    time_budget: float = 0.0
    audit_samples: int = 20  # BAT rejects at the generation level re-decided with a long LP budget
    audit_budget: float = 5.0
    grid_points: int = 12
    tolerance: float = 0.005  # matched shares must lie within this of the target
    kept_positions: int = 120  # teacher-forced steps of the accepted-set analysis
    kept_candidates: int = 8  # exact decisions per step in that analysis (mask mode)
    feature_model: str = "gemma3"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SMOKE = Settings(
    models=("smollm2",),
    passages=4,
    positions=10,
    levels=(0.10,),
    generate_levels=(0.10,),
    seeds=(0, 1),
    max_tokens=10,
    grid_points=5,
    kept_positions=8,
    kept_candidates=2,
    feature_model="smollm2",
    audit_samples=2,
    audit_budget=1.0,
)


def model_path(name: str) -> str:
    from bat_models import gemma3_270m_path, smollm2_path

    paths = {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}
    if name not in paths:
        raise BatError(f"unknown model {name!r}: use smollm2 or gemma3")
    return paths[name]()


def say(message: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: str, data: Any) -> None:
    """Atomic: a stage killed half-way leaves no file, so a re-run redoes it rather than trusting it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def check_settings(out: str, settings: Settings) -> None:
    """A results folder belongs to one set of settings: refuse to mix, never overwrite."""
    path = os.path.join(out, "settings.json")
    wanted = json.loads(json.dumps(settings.as_dict()))
    if os.path.isfile(path):
        found = read_json(path)
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise BatError(
                f"{out} holds results of other settings (differs in {', '.join(changed)}): "
                "use another --out folder, or delete that one to start over"
            )
    else:
        write_json(path, wanted)


def threads() -> int:
    """llama.cpp threads (BAT_EVAL_THREADS, default all cores): fewer leave a core to other work, since
    llama.cpp's threads wait for each other and slow down badly when a core is taken."""
    return int(os.environ.get("BAT_EVAL_THREADS", os.cpu_count() or 1))


def load_model(name: str):
    from llama_cpp import Llama

    from bat_llamacpp import BatLlama

    llm = Llama(model_path=model_path(name), n_ctx=512, seed=0, verbose=False, n_threads=threads())
    bat = BatLlama(llm)
    bat.warm_up()
    return llm, bat


# ---------------------------------------------------------------------------------------------- matching
def run_matching(out: str, name: str, settings: Settings, passages, llm, bat) -> dict:
    path = os.path.join(out, name, "matching.json")
    if os.path.isfile(path):
        return read_json(path)
    start = time.perf_counter()
    say(f"{name}: teacher forcing {len(passages)} passages")
    positions = matching.teacher_force(llm, passages, settings.positions)
    decider = matching.Decider(bat.basis, positions, settings.time_budget)
    matcher = matching.Matcher(positions, decider)
    grids = {}
    for method in matching.METHODS:
        thetas = np.geomspace(*matching.GRID_RANGE[matching.rule_of(method)], settings.grid_points)
        shares, unproven = zip(*matcher.curve(method, thetas))
        grids[method] = {"parameters": thetas.tolist(), "shares": list(shares), "fallback_shares": list(unproven)}
        say(f"{name}: {method} grid done ({decider.decisions} BAT decisions, {decider.fallbacks} fallbacks)")
    matches = {}
    for level in settings.levels:
        matches[str(level)] = {m: matcher.match(m, level, settings.tolerance) for m in matching.METHODS}
        say(
            f"{name}: matched {level:.0%}: "
            + ", ".join(f"{m}={r['parameter']:.3g}" for m, r in matches[str(level)].items())
        )
    kept = kept_sets(bat.basis, positions, matches, settings)
    audit = audit_rejects(bat.basis, positions, matches, settings)
    result = {
        "model": name,
        "positions": len(positions),
        "passages": len(passages),
        "argmax_share": float(positions.is_argmax.mean()),
        "median_p": float(np.median(positions.p)),
        "grids": grids,
        "matches": matches,
        "kept": kept,
        "audit": audit,
        "bat_decisions": decider.decisions,
        "bat_fallbacks": decider.fallbacks,
        "bat_seconds": decider.seconds,
        "seconds": time.perf_counter() - start,
        "teacher_forced": {
            "passage": positions.passage.tolist(),
            "token": positions.token.tolist(),
            "p": positions.p.tolist(),
            "entropy": positions.entropy.tolist(),
            "is_argmax": positions.is_argmax.tolist(),
            **positions.brackets(),
        },
    }
    write_json(path, result)
    return result


def kept_sets(basis: bat_core.Basis, positions: matching.Positions, matches: dict, settings: Settings) -> dict:
    """What BAT keeps that its threshold drops, per step at the same tau: accepted-set sizes and mass
    (mask mode: every token in BAT's set is proven) on evenly spaced teacher-forced steps."""
    level = str(settings.generate_levels[0])
    if level not in matches:
        return {}
    rows = np.linspace(0, len(positions) - 1, min(settings.kept_positions, len(positions))).astype(int)
    result = {}
    for method in ("bat-eta", "bat-epsilon"):
        theta = matches[level][method]["parameter"]
        sampler = bat_core.BatSampler(
            basis,
            ThresholdRule(matching.rule_of(method), theta),
            config=bat_core.BatConfig.for_generation(settings.time_budget),
            mask_candidates=settings.kept_candidates,
            mask_budget=60.0,
        )
        steps = []
        for i in rows:
            m = sampler.mask(positions.logits[int(i)])
            steps.append(
                {
                    "tau": m.tau,
                    "threshold_size": int(m.mask.sum() - m.accepted_below_tau),
                    "threshold_mass": m.threshold_mass,
                    "bat_size": int(m.mask.sum()),
                    "bat_mass": m.mask_mass,
                    "undecided_mass": m.undecided_mass,
                    "accepted_below_tau": m.accepted_below_tau,
                }
            )
        result[method] = {"level": float(level), "parameter": theta, "steps": steps}
    return result


def audit_rejects(basis: bat_core.Basis, positions: matching.Positions, matches: dict, settings: Settings) -> dict:
    """What the decision budget costs: human tokens that BAT rejects at the generation level, decided
    again by the exact LP with a long budget (evenly spaced sample). An exact accept among them is a
    token that exact BAT would keep; 'undecided' ones ran out of even that budget."""
    level = str(settings.generate_levels[0])
    if level not in matches or settings.audit_samples == 0:
        return {}
    result = {}
    for method in ("bat-eta", "bat-epsilon"):
        theta = matches[level][method]["parameter"]
        tau = matching.tau_of(matching.rule_of(method), theta, positions.entropy)
        rejected = np.flatnonzero(positions.bat_rejects(tau))
        sample = (
            rejected[np.linspace(0, len(rejected) - 1, min(settings.audit_samples, len(rejected))).astype(int)]
            if len(rejected)
            else rejected
        )
        counts = {"accept": 0, "reject": 0, "undecided": 0}
        start = time.perf_counter()
        for i in sample:
            solver = bat_core.BatSolver(basis, bat_core.BatConfig(time_budget=settings.audit_budget))
            decision = solver.decide(
                solver.new_step(positions.logits[int(i)], float(tau[i])), [int(positions.token[i])]
            )[0]
            counts["accept" if decision.accepted else "undecided" if decision.method == "fallback" else "reject"] += 1
        result[method] = {
            "level": float(level),
            "parameter": theta,
            "rejects": int(len(rejected)),
            "sampled": int(len(sample)),
            "budget": settings.audit_budget,
            "seconds": time.perf_counter() - start,
            **counts,
        }
    return result


# -------------------------------------------------------------------------------------------- generation
def run_generations(out: str, name: str, settings: Settings, passages, llm, bat, matched: dict) -> list[dict]:
    folder = os.path.join(out, name, "generations")
    human_path = os.path.join(folder, "human.json")
    if not os.path.isfile(human_path):
        write_json(
            human_path,
            {
                "texts": generation.human_reference(llm, passages, settings.max_tokens),
                "passages": [p.as_dict() for p in passages],
            },
        )
    runs = []
    plan = [("untruncated", None, None)] + [
        (sampler, level, matched[str(level)][sampler]["parameter"])
        for level in settings.generate_levels
        for sampler in generation.SAMPLERS[1:]
    ]
    for sampler, level, parameter in plan:
        for seed in settings.seeds:
            tag = "untruncated" if level is None else f"{sampler}-level{level:g}"
            path = os.path.join(folder, f"{tag}-seed{seed}.json")
            if not os.path.isfile(path):
                run = generation.generate_run(
                    llm,
                    bat,
                    passages,
                    sampler,
                    parameter,
                    seed,
                    settings.max_tokens,
                    settings.time_budget,
                )
                run["level"] = level
                write_json(path, run)
                say(
                    f"{name}: {tag} seed {seed}: {run['tokens']} tokens, {run['tokens_per_second']:.1f} tok/s"
                    + (
                        f", {run['below_tau']} below tau, {run['fallbacks']} fallbacks"
                        if sampler.startswith("bat-")
                        else ""
                    )
                )
            runs.append(read_json(path))
    return runs


# ----------------------------------------------------------------------------------------------- quality
def run_quality(out: str, name: str, settings: Settings, runs: list[dict], featurizer) -> dict:
    """Metrics per run and their mean and 95% CI over seeds, per (sampler, level)."""
    human = read_json(os.path.join(out, name, "generations", "human.json"))["texts"]
    human_features = featurizer(human)
    per_run, groups, pooled = [], {}, {}
    for run in runs:
        texts = [r["text"] for r in run["rows"]]
        metrics = quality.text_metrics(texts, [r["tokens"] for r in run["rows"]])
        features = featurizer(texts)
        metrics["mauve"] = quality.mauve_score(human_features, features)
        key = run["sampler"] if run["level"] is None else f"{run['sampler']}@{run['level']:g}"
        per_run.append({"group": key, "seed": run["seed"], "parameter": run["parameter"], **metrics})
        groups.setdefault(key, []).append(metrics)
        pooled.setdefault(key, []).append(features)
    summary = {
        key: {metric: quality.mean_ci([m[metric] for m in rows]) for metric in rows[0]} for key, rows in groups.items()
    }
    # all seeds of a sampler against the human continuations: more samples, so more MAUVE buckets
    for key, blocks in pooled.items():
        summary[key]["mauve_pooled"] = {
            "mean": quality.mauve_score(human_features, np.concatenate(blocks)),
            "ci95": float("nan"),
            "n": 1,
        }
    human_metrics = quality.text_metrics(human, [0] * len(human))
    result = {"model": name, "runs": per_run, "summary": summary, "human": human_metrics}
    write_json(os.path.join(out, name, "quality.json"), result)
    return result


def evaluate(out: str, settings: Settings) -> dict:
    """All stages for every model, then the report."""
    from .report import write_report

    os.makedirs(out, exist_ok=True)
    check_settings(out, settings)
    passages = load_passages(settings.passages, prefix_words=settings.prefix_words)
    write_json(os.path.join(out, "passages.json"), [p.as_dict() for p in passages])
    say(f"{len(passages)} passages from Debian's fortunes; models: {', '.join(settings.models)}")
    featurizer = quality.Featurizer(
        model_path(settings.feature_model),
        os.path.join(out, "features", settings.feature_model),
        threads(),
    )
    results = {}
    for name in settings.models:
        llm, bat = load_model(name)
        matched = run_matching(out, name, settings, passages, llm, bat)
        runs = run_generations(out, name, settings, passages, llm, bat, matched["matches"])
        say(f"{name}: quality (features: {settings.feature_model})")
        results[name] = {
            "matching": matched,
            "quality": run_quality(out, name, settings, runs, featurizer),
            "runs": runs,
        }
        del llm, bat
    write_report(out, settings, results)
    say(f"done: {os.path.join(out, 'report.md')}")
    return results
