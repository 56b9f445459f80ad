"""python -m bat_eval.reaudit MODEL [--out FOLDER]: the reject audit again, with the current core.

The evaluation (python -m bat_eval) audits a sample of the human tokens that BAT rejects at the
generation level, deciding them again with the exact path and a long budget (pipeline.audit_rejects).
This re-runs only that audit on the same teacher-forced positions, so a change to the exact path can be
measured without redoing the evaluation: it teacher-forces the model again (the tokens must match the
stored ones), takes the stored matches and BAT brackets, and writes <folder>/<model>/audit_rerun.json
beside the stored audit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from bat_core import BatError

from . import human_text, matching
from .pipeline import Settings, audit_rejects, load_model, read_json, say, write_json


def reaudit(folder: str, name: str) -> dict:
    settings_path, matching_path = os.path.join(folder, "settings.json"), os.path.join(folder, name, "matching.json")
    for path in (settings_path, matching_path):
        if not os.path.isfile(path):
            raise BatError(f"{path} not found: run python -m bat_eval --out {folder} first")
    stored = read_json(settings_path)
    settings = Settings(
        **{
            f.name: tuple(stored[f.name]) if isinstance(stored[f.name], list) else stored[f.name]
            for f in dataclasses.fields(Settings)
            if f.name in stored
        }
    )
    result = read_json(matching_path)
    passages = human_text.load_passages(settings.passages, settings.prefix_words)
    llm, bat = load_model(name)
    say(f"{name}: teacher forcing {len(passages)} passages again")
    positions = matching.teacher_force(llm, passages, settings.positions)
    forced = result["teacher_forced"]
    if positions.token.tolist() != forced["token"]:
        raise BatError(f"teacher forcing {name} gave other tokens than {matching_path}: the model or passages changed")
    positions.accept_tau = np.array(forced["accept_tau"], dtype=float)
    positions.reject_tau = np.array([np.inf if t is None else t for t in forced["reject_tau"]], dtype=float)
    positions.fallback = np.array(forced["fallback"], dtype=bool)
    start = time.perf_counter()
    audit = audit_rejects(bat.basis, positions, result["matches"], settings)
    report = {
        "model": name,
        "stored": result["audit"],
        "rerun": audit,
        "seconds": time.perf_counter() - start,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_json(os.path.join(folder, name, "audit_rerun.json"), report)
    for method, a in audit.items():
        old = result["audit"].get(method, {})
        say(
            f"{name} {method}: exact accept {a['accept']}, exact reject {a['reject']}, undecided {a['undecided']}"
            f" of {a['sampled']} (stored: {old.get('accept')} / {old.get('reject')} / {old.get('undecided')})"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bat_eval.reaudit", description=__doc__)
    parser.add_argument("model", help="smollm2 or gemma3")
    parser.add_argument("--out", default="results/evaluation", help="the evaluation's results folder")
    args = parser.parse_args(argv)
    try:
        reaudit(args.out, args.model)
    except BatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
