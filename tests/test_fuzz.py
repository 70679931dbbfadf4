"""Bounded fuzzing of the public API and the raw ops on every available backend (a fixed seed,
so CI sees the same cases every run). Every outcome must be a result matching the float64
reference within the tolerance rule, or a ValueError/TypeError naming the malformed argument.
scripts/fuzz.py runs the same fuzzer for a given number of minutes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fuzzing

TARGETS = fuzzing.available_targets()
FAST = [t for t in TARGETS if not t.endswith("triton")]
INTERPRETED = [t for t in TARGETS if t.endswith("triton")]  # Triton's interpreter is slow

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fuzz_test(targets, max_examples):
    """A test fuzzing each of targets with max_examples drawn cases."""

    @pytest.mark.parametrize("target", targets)
    @seed(20261201)
    @settings(max_examples=max_examples, **_SETTINGS)
    @given(data=st.data())
    def test(target, data):
        assert fuzzing.fuzz_one(fuzzing.HypothesisDraw(data), [target]) in ("ok", "clean_error")

    return test


test_fuzz = _fuzz_test(FAST, 80)
test_fuzz_triton_interpreter = _fuzz_test(INTERPRETED, 15)
