"""python -m bat_eval [--smoke] [--out FOLDER] [options]: the whole evaluation, resumable."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bat_core import BatError

from .pipeline import SMOKE, Settings, evaluate


def numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bat_eval", description=__doc__)
    parser.add_argument("--out", default="results/evaluation", help="results folder (re-run to resume)")
    parser.add_argument("--smoke", action="store_true", help="a minutes-long version on SmolLM2 (what CI runs)")
    defaults = Settings()
    parser.add_argument("--models", type=numbers(str), help=f"default {','.join(defaults.models)}")
    parser.add_argument("--passages", type=int, help=f"human passages (default {defaults.passages})")
    parser.add_argument(
        "--positions", type=int, help=f"teacher-forced tokens per passage (default {defaults.positions})"
    )
    parser.add_argument("--levels", type=numbers(float), help="human rejection shares to match (default 0.05,0.1,0.25)")
    parser.add_argument("--generate-levels", type=numbers(float), help="levels to generate at (default 0.1)")
    parser.add_argument("--seeds", type=numbers(int), help="default 0,1,2")
    parser.add_argument("--max-tokens", type=int, help=f"tokens per continuation (default {defaults.max_tokens})")
    parser.add_argument("--time-budget", type=float, help=f"seconds per BAT decision (default {defaults.time_budget})")
    parser.add_argument(
        "--feature-model", help=f"MAUVE's feature model: smollm2 or gemma3 (default {defaults.feature_model})"
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else defaults
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    if not set(settings.generate_levels) <= set(settings.levels):
        parser.error("every --generate-levels value must be one of --levels")
    try:
        evaluate(args.out, settings)
    except BatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
