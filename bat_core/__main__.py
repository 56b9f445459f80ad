"""python -m bat_core: the set-up step that builds the compiled int8 product for this machine (bat_core/q8.py)
and prints whether it is in use, or why not."""

from . import q8

outcome = q8.build()
print(q8.kernel_status() if outcome == "built" else outcome)
