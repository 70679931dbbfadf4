"""attnkern: fused attention-pooling kernels for recommender systems.

    out = attnkern.attention_pool(query, key, value, lengths)
    out = attnkern.activation_unit_pool(query, key, key, weights, lengths)   # DIN
    w = attnkern.attention_weights(query, key, lengths)                      # the softmax weights
    out = attnkern.sequence_attention(q, k, v, offsets, causal=True)        # HSTU, SASRec
    scores, idx = attnkern.attention_topk(q, keys, k=50, lengths=lengths)   # SIM, TWIN

See README.md for the shapes, mask polarity (True = attend) and the backends.
"""

def _alias_triton_kernels():
    """Make `attnkern.triton_kernels` importable from a source checkout too.

    Installed, setup.py maps the top-level folder triton_kernels/ to attnkern.triton_kernels
    (a top-level name `triton_kernels` would collide with Triton's own package)."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".triton_kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# Before anything imports attnkern.triton_kernels (the Triton backend).
_alias_triton_kernels()

from . import models, nn  # noqa: E402  (public submodules: attnkern.nn.AttentionPooling, ...)
from ._validation import set_validation, validation_enabled  # noqa: E402
from .functional import (activation_unit_pool, activation_unit_weights, attention_pool,  # noqa: E402
                         attention_weights)
from .ops import BackendInfo, BackendUnavailable, backends  # noqa: E402
from .reference import (activation_unit_pool_ref, activation_unit_weights_ref, attention_pool_ref,  # noqa: E402
                        attention_weights_ref, sequence_attention_ref)
from .reference import attention_topk_ref  # noqa: E402
from .quantize import quantize_rows, split_fused_rows  # noqa: E402
from .reference import attention_pool_quant_ref, dequantize_rows  # noqa: E402
from .sequence import sequence_attention  # noqa: E402
from .topk import attention_topk  # noqa: E402

try:
    # Imported for its side effect: registers the Triton custom ops attnkern::triton_* up
    # front, so that torch.compile and direct torch.ops.attnkern.triton_* calls see them.
    from .ops import triton as _triton_ops  # noqa: E402,F401
except ImportError:  # Triton is not installed: backends()["triton"] says so
    pass

__version__ = "0.1.0"

__all__ = [
    "attention_pool",
    "attention_weights",
    "attention_topk",
    "attention_topk_ref",
    "activation_unit_pool",
    "activation_unit_weights",
    "sequence_attention",
    "sequence_attention_ref",
    "attention_pool_ref",
    "attention_pool_quant_ref",
    "quantize_rows",
    "dequantize_rows",
    "split_fused_rows",
    "activation_unit_pool_ref",
    "attention_weights_ref",
    "activation_unit_weights_ref",
    "backends",
    "BackendInfo",
    "BackendUnavailable",
    "models",
    "nn",
    "set_validation",
    "validation_enabled",
    "__version__",
]
