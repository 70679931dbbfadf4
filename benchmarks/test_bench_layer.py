"""Layer and model benchmarks through pytest-benchmark: the cases of `attnkern bench --family
layer`.

Each layer test times one provider (AttentionPooling with absorb="auto" and absorb=False, the
eager FuxiCTR-style layer, nn.MultiheadAttention) on one shape and mode, after checking its
output against AttentionPooling(absorb=False) with the same weights; each model test times
one TargetAttentionCTR training step (forward, backward, Adam) with the attnkern layer, the
eager layer, or sum pooling. Group by case to read the ratios; no timing is asserted.

    pytest benchmarks/test_bench_layer.py                  # tiny + quick shapes, model step
    pytest benchmarks/test_bench_layer.py --attnkern-full  # the whole layer grid
"""

import pytest

from attnkern.tools.bench import layers

TINY = layers.LayerShape(16, 8, 2, 10, 1)


def pytest_generate_tests(metafunc):
    if "layer_shape" in metafunc.fixturenames:
        full = metafunc.config.getoption("--attnkern-full")
        shapes = (TINY,) + (layers.FULL_LAYER_SHAPES if full else layers.QUICK_LAYER_SHAPES)
        metafunc.parametrize("layer_shape", shapes, ids=[s.name for s in shapes])


@pytest.fixture
def cpu_only(device):
    if device != "cpu":
        pytest.skip("the layer family runs on CPU")


@pytest.mark.parametrize("mode", layers.MODES)
@pytest.mark.parametrize("provider", layers.LAYER_PROVIDERS)
def test_layer(benchmark, cpu_only, layer_shape, mode, provider):
    err = layers.check_layers(layer_shape, [provider])[provider]
    assert err <= 1e-4, "%s disagrees with AttentionPooling(absorb=False) on %s: %.3g" % (
        provider, layer_shape.name, err)
    benchmark.group = "layer-%s-%s" % (layer_shape.name, mode)
    benchmark.extra_info.update(family="layer", provider=provider, mode=mode,
                                shape=layer_shape.as_dict(),
                                order=layers.order_of(provider, layer_shape))
    benchmark(layers.layer_callable(provider, layer_shape, mode))


@pytest.mark.parametrize("provider", layers.MODEL_PROVIDERS)
def test_model_step(benchmark, cpu_only, provider):
    benchmark.group = "model-step-%s-%ditems" % (layers.MODEL_SHAPE.name, layers.MODEL_ITEMS)
    benchmark.extra_info.update(family="model", provider=provider,
                                shape=dict(layers.MODEL_SHAPE.as_dict(), items=layers.MODEL_ITEMS))
    benchmark(layers.model_step_callable(provider))
