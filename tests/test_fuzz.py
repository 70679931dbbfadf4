"""Bounded fuzzing of the public API and the raw ops on every available backend (a fixed seed,
so CI sees the same cases every run). Every outcome must be a result matching the float64
reference within the tolerance rule, or a ValueError/TypeError naming the malformed argument.
scripts/fuzz.py runs the same fuzzer for a given number of minutes. The command line's numeric
arguments are fuzzed here too: every bad value a usage error naming the option."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fuzzing

TARGETS = fuzzing.available_targets()
FAST = [t for t in TARGETS if not t.endswith("triton") and not t.startswith("seq:")]
SEQUENCE = [t for t in TARGETS if t.startswith("seq:")]  # a float64 oracle per case: fewer
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
test_fuzz_sequence = _fuzz_test(SEQUENCE, 40)
test_fuzz_triton_interpreter = _fuzz_test([t for t in INTERPRETED if not t.startswith("au:")], 15)
# The activation unit's Triton kernels, forward and backward, through the interpreter: the
# slowest cases of all (CI runs them; the fast subset leaves them out).
test_fuzz_activation_triton_interpreter = pytest.mark.slow(
    _fuzz_test([t for t in INTERPRETED if t.startswith("au:")], 10))


@seed(20261207)
@settings(max_examples=60, **_SETTINGS)
@given(data=st.data())
def test_fuzz_cli_numeric_arguments(data, tmp_path_factory):
    """A bad numeric value of any command is a usage error (exit status 2) naming the option,
    raised before any model, data or kernel is touched."""
    from attnkern.tools import cli

    argv, option = fuzzing.draw_cli_bad_value(fuzzing.HypothesisDraw(data))
    tmp = str(tmp_path_factory.getbasetemp())
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli.main([a.replace("{tmp}", tmp) for a in argv])
    assert exc.value.code == 2 and "argument %s" % option in err.getvalue(), (argv, err.getvalue())
