"""The evaluation pipeline (python -m bat_eval --smoke) end to end on SmolLM2 in llama.cpp, and its invariants."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bat_eval import quality
from bat_eval.human_text import COLLECTIONS, load_passages
from bat_eval.matching import METHODS, rule_of, tau_of

pytestmark = pytest.mark.slow


def run_smoke(out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bat_eval", "--smoke", "--out", out, *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evaluation"))
    done = run_smoke(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def load(path: str):
    with open(path) as handle:
        return json.load(handle)


def test_human_text_is_prose_from_fortunes():
    passages = load_passages(20, prefix_words=16)
    assert len({p.id for p in passages}) == 20
    for p in passages:
        assert len(p.prefix.split()) == 16 and len(p.continuation.split()) >= 24
        assert p.id.split(":")[0] in COLLECTIONS  # the prose collections only
    assert [p.id for p in load_passages(20)] == [p.id for p in passages]  # fixed seed


def test_text_metrics():
    assert quality.distinct_n(["a b c d", "a b e f"], 1) == pytest.approx(6 / 8)
    assert quality.distinct_n(["a b c d", "a b e f"], 2) == pytest.approx(5 / 6)
    assert quality.repetition("x y z w x y z w") == pytest.approx(1 - 4 / 5)
    assert quality.repetition("one two three four five") == 0.0
    ci = quality.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def test_results_are_written_and_readable(smoke):
    for name in (
        "settings.json",
        "passages.json",
        "summary.json",
        "report.md",
        "rejection_share.png",
        "quality.png",
        "smollm2/matching.json",
        "smollm2/quality.json",
        "smollm2/generations/human.json",
    ):
        assert os.path.getsize(os.path.join(smoke, name)) > 0, name
    summary = load(os.path.join(smoke, "summary.json"))
    groups = summary["models"]["smollm2"]["quality"]
    assert set(groups) == {"untruncated", "eta@0.1", "epsilon@0.1", "bat-eta@0.1", "bat-epsilon@0.1"}
    for stats in groups.values():
        assert 0.0 < stats["mauve"]["mean"] <= 1.0 and stats["mauve"]["n"] == 2
        assert stats["length_tokens"]["mean"] > 0
    runs = [
        load(os.path.join(smoke, "smollm2", "generations", f))
        for f in os.listdir(os.path.join(smoke, "smollm2", "generations"))
        if f != "human.json"
    ]
    assert len(runs) == 10 and all(len(r["rows"]) == 4 and r["tokens"] > 0 for r in runs)


def test_matched_parameters_reject_the_target_share(smoke):
    """Recomputed here from the teacher-forced record: each method's matched parameter rejects the
    target share of human tokens, within the stated tolerance plus one position's step."""
    settings = load(os.path.join(smoke, "settings.json"))
    matching = load(os.path.join(smoke, "smollm2", "matching.json"))
    tf = matching["teacher_forced"]
    p, entropy, argmax = np.array(tf["p"]), np.array(tf["entropy"]), np.array(tf["is_argmax"])
    accept_tau = np.array(tf["accept_tau"])
    reject_tau = np.array([np.inf if t is None else t for t in tf["reject_tau"]])
    n = len(p)
    assert n == matching["positions"] > 0
    for level, row in matching["matches"].items():
        for method in METHODS:
            match = row[method]
            tau = tau_of(rule_of(method), match["parameter"], entropy)
            threshold = (p < tau) & ~argmax
            if method.startswith("bat-"):
                assert not np.any(threshold & (tau > accept_tau) & (tau < reject_tau)), "undecided position"
                rejected = threshold & (tau >= reject_tau)
            else:
                rejected = threshold
            assert rejected.mean() == pytest.approx(match["share"])
            assert abs(rejected.mean() - float(level)) <= settings["tolerance"] + 1 / n, (method, level)
            assert match["within_tolerance"]


def test_bat_never_rejects_what_its_threshold_keeps(smoke):
    matching = load(os.path.join(smoke, "smollm2", "matching.json"))
    tf = matching["teacher_forced"]
    p, argmax = np.array(tf["p"]), np.array(tf["is_argmax"])
    accept_tau = np.array(tf["accept_tau"])
    reject_tau = np.array([np.inf if t is None else t for t in tf["reject_tau"]])
    decided = np.isfinite(reject_tau)
    assert decided.any() and (accept_tau > 0).any()  # both kinds of decisions happened
    assert np.all(p[decided] < reject_tau[decided]) and not np.any(argmax[decided])  # decided only below tau
    assert np.all(accept_tau <= reject_tau)  # monotone in tau
    for method in METHODS:  # on every grid point: BAT's rejects are a subset of its base's
        if not method.startswith("bat-"):
            continue
        base, bat = matching["grids"][rule_of(method)], matching["grids"][method]
        assert base["parameters"] == bat["parameters"]
        assert all(b <= t + 1e-12 for b, t in zip(bat["shares"], base["shares"]))
    for kept in matching["kept"].values():
        for step in kept["steps"]:
            assert step["bat_size"] >= step["threshold_size"]
            assert step["bat_mass"] >= step["threshold_mass"] - 1e-12
            assert step["bat_mass"] + step["undecided_mass"] <= 1 + 1e-9


def test_resume_skips_finished_stages_and_refuses_other_settings(smoke):
    matching = os.path.join(smoke, "smollm2", "matching.json")
    before = os.stat(matching).st_mtime_ns
    again = run_smoke(smoke)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.stat(matching).st_mtime_ns == before
    assert "teacher forcing" not in again.stderr
    other = run_smoke(smoke, "--passages", "5")
    assert other.returncode == 2 and "other settings" in other.stderr and "passages" in other.stderr


def test_reaudit_repeats_the_audit_on_the_same_positions(smoke):
    """python -m bat_eval.reaudit re-decides the audited rejects with the current core on positions that
    it teacher-forces again (refusing if the tokens differ); every sampled token gets one outcome."""
    done = subprocess.run(
        [sys.executable, "-m", "bat_eval.reaudit", "smollm2", "--out", smoke],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = load(os.path.join(smoke, "smollm2", "audit_rerun.json"))
    stored = load(os.path.join(smoke, "smollm2", "matching.json"))["audit"]
    assert set(report["rerun"]) == set(stored) == {"bat-eta", "bat-epsilon"}
    for method, audit in report["rerun"].items():
        assert audit["rejects"] == stored[method]["rejects"] and audit["sampled"] == stored[method]["sampled"] > 0
        assert audit["accept"] + audit["reject"] + audit["undecided"] == audit["sampled"]
    missing = subprocess.run(
        [sys.executable, "-m", "bat_eval.reaudit", "smollm2", "--out", smoke + "/nothing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr
