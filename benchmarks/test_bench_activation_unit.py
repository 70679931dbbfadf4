"""activation_unit_pool (DIN attention) benchmarks through pytest-benchmark: the cases of
attnkern.tools.bench.activation (B=1024 L=200 E=64, units (64,) and (80, 40)) against FuxiCTR's
DIN_Attention eager and compiled. Each provider's output and gradients are checked against the
eager layer once before timing; no timing is asserted. FLOPs go to extra_info.

    pytest benchmarks/test_bench_activation_unit.py                 # the benchmark cases
    pytest benchmarks/test_bench_activation_unit.py -k tiny --benchmark-disable    # smoke
"""

import pytest
import torch

import attnkern
from attnkern.tools.bench import activation as ba

# "tiny" ids: the CI smoke run (pytest benchmarks -k tiny --benchmark-disable) runs these once.
CASES = [pytest.param(c, id="tiny-" + c.id) for c in ba.QUICK_CASES] + \
        [pytest.param(c, id=c.id) for c in ba.DEFAULT_CASES]


# Argument names differ from conftest's case/provider, which it parametrizes for attention_pool.
@pytest.mark.parametrize("mode", ba.MODES)
@pytest.mark.parametrize("au_provider", ba.PROVIDERS)
@pytest.mark.parametrize("au_case", CASES)
def test_activation_unit_pool(benchmark, au_case, au_provider, mode):
    case, provider = au_case, au_provider
    if provider in ("reference", "cpu") and not attnkern.backends()[provider].available:
        pytest.skip(attnkern.backends()[provider].reason)
    if provider == "reference" and case.B * case.L > 10000 and mode == "fwd+bwd":
        pytest.skip("the reference's fwd+bwd at this size takes minutes")
    q, k, lengths, mask, module = ba.build(case)
    want, want_g = ba.provider_fn("eager", case, q, k, lengths, mask, module, mode)()
    fn = ba.provider_fn(provider, case, q, k, lengths, mask, module, mode)
    out, grads = fn()  # warm-up (and compile); checked, never timed
    for g, w in zip((out,) + tuple(grads), (want,) + tuple(want_g)):
        assert ba.rel_error(g, w) <= 1e-3
    benchmark.group = "%s-%s" % (case.id, mode)
    benchmark.extra_info.update(op="activation_unit_pool", provider=provider, mode=mode, case=case.id,
                                flops=ba.flops(case, mode), threads=torch.get_num_threads())
    benchmark(fn)
