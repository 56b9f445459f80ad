"""The quality evaluation of BAT against threshold sampling (issue 5): the paper's experiments, offline.

    python -m bat_eval --out results/evaluation          # or: bash scripts/evaluate.sh

Stages (each writes JSON under the results folder and is skipped when its file is there):
1. human text: prefixes and human continuations from Debian's `fortunes` package;
2. matching: teacher-forced on the human text, the share of human next tokens each method rejects,
   over a parameter grid, and the parameter of each method that rejects a target share;
3. generation: continuations of the prefixes with the llama.cpp adapter at matched parameters;
4. quality: MAUVE, distinct-n, repetition and length with confidence intervals over seeds;
5. report: tables (JSON + markdown) and PNG plots.
"""
