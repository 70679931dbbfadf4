"""pytest-benchmark options and parametrisation for the attnkern benchmark suite.

    pytest benchmarks/                          # the quick set of `attnkern bench` + the tiny case
    pytest benchmarks/ --attnkern-full          # the --full set
    pytest benchmarks/ --attnkern-device cuda   # default: cuda when a GPU is visible
    pytest benchmarks/ --attnkern-threads 1     # steadier CPU numbers on a busy machine
    pytest benchmarks/ -k tiny --benchmark-disable   # CI smoke: each tiny case runs once

Kept out of the default test run: the project's pytest config collects tests/ only.
"""

import pytest

pytest.importorskip("pytest_benchmark")

from attnkern.tools import bench  # noqa: E402

# The machine's limit for the same bytes is benchmarked next to the providers.
SUITE_PROVIDERS = ("limit",) + bench.PROVIDERS


def pytest_addoption(parser):
    group = parser.getgroup("attnkern")
    group.addoption("--attnkern-full", action="store_true", default=False,
                    help="benchmark the full case set of `attnkern bench --full`")
    group.addoption("--attnkern-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark on (default: cuda when a GPU is visible)")
    group.addoption("--attnkern-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (1 gives steadier CPU numbers on a "
                         "busy machine)")


def pytest_configure(config):
    threads = config.getoption("--attnkern-threads")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _cases(config):
    if config.getoption("--attnkern-full"):
        return bench.tiny_cases() + bench.full_cases()
    return bench.tiny_cases() + bench.quick_cases()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "provider" in metafunc.fixturenames:
        params = [pytest.param(c, p, id="%s-%s" % (c.id, p))
                  for c in _cases(metafunc.config) for p in SUITE_PROVIDERS]
        metafunc.parametrize("case,provider", params)


@pytest.fixture(scope="session")
def device(request):
    import torch

    dev = request.config.getoption("--attnkern-device")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--attnkern-device cuda but no CUDA GPU is visible")
    return dev


_setups = {}


@pytest.fixture
def case_setup(case, device):
    """One setup per case (inputs, oracle, byte counts), shared by the case's providers."""
    key = (case, device)
    if key not in _setups:
        _setups.clear()  # keep one case's tensors alive at a time
        _setups[key] = bench.setup_case(case, device)
    return _setups[key]
