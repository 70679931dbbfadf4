"""attention_pool benchmarks through pytest-benchmark: the cases of `attnkern bench`.

Each test times one provider on one case (shape, lengths, dtype, mode). Before timing, the
provider's output (and gradients for fwd+bwd) is checked once against a float64 oracle on the
non-empty rows: a wrong kernel fails here, a slow one never does (no timing is asserted).
Bytes, FLOPs and the case's shape go to extra_info, so the JSON of --benchmark-json has
everything needed to compute GB/s and the fraction of the limit.
"""

import pytest
import torch

from attnkern.tools import bench


def _synced(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def test_attention_pool(benchmark, case_setup, provider, device):
    try:
        fn = case_setup.callable(provider)
    except bench.Unavailable as e:
        pytest.skip(str(e))
    # The first call compiles (compile, flex), warms up and is checked; it is never timed.
    outputs = fn()
    if provider != "limit":
        ok, err = case_setup.check(outputs)
        assert ok, "%s disagrees with the float64 oracle on %s: error %.3g > %.3g" % (
            provider, case_setup.case.id, err, case_setup.oracle.tolerance())
    c = case_setup.case
    benchmark.group = c.id
    benchmark.extra_info.update(
        op=bench.OP, provider=provider, mode=c.mode, dtype=c.dtype, device=str(device),
        shape=dict(c.shape.as_dict(), lengths=c.lengths, total_len=case_setup.inputs.total_len),
        bytes=case_setup.nbytes, flops=case_setup.nflops)
    del outputs
    benchmark(_synced(fn, device))
