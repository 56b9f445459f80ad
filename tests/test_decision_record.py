"""The core's decisions on fixed random and real cases equal the committed record (tests/decision_record.py):
a refactoring that means to keep behaviour must keep these; a change meant to alter them rewrites the record
with `python tests/decision_record.py --write` and says why in its commit."""

import json

import pytest
from decision_record import RECORD, differences, record

import bat_core

pytest.importorskip("llama_cpp", reason="real-model tests need llama-cpp-python (scripts/setup.sh)")


@pytest.mark.slow
def test_decisions_equal_the_record(basis):
    bat_core.limit_blas_threads()  # one BLAS thread, as the record was made: sums in one order
    with open(RECORD) as f:
        expected = json.load(f)
    diff = differences(expected, record(basis))
    assert not diff, f"{len(diff)} of {len(expected)} decisions changed:\n" + "\n".join(diff[:20])
