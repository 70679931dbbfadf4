"""The op schemas on the Python side, declared once.

The C++ ops (csrc/attention_pool_ops.cpp, TORCH_LIBRARY(attnkern)) are the source of truth; the Triton ops
attnkern::triton_<name> are declared here with the very same signatures, and
tests/test_schemas.py compares the two as the dispatcher parsed them. The autograd glue
(attnkern/ops/autograd.py) reads the forward ops' argument names from here too.
"""

from __future__ import annotations

from typing import Tuple

import torch

NAMESPACE = "attnkern"
TRITON_PREFIX = "triton_"

# op name -> "(arguments) -> (returns)"
SCHEMAS = {
    "attention_pool_fwd": (
        "(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, float scale, "
        "Tensor? bias=None) -> (Tensor out, Tensor lse)"
    ),
    "attention_pool_bwd": (
        "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
        "Tensor lse, Tensor delta, float scale, Tensor? bias=None) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)"
    ),
    "jagged_attention_pool_fwd": (
        "(Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, float scale, "
        "Tensor? bias=None) -> (Tensor out, Tensor lse)"
    ),
    "jagged_attention_pool_bwd": (
        "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, "
        "Tensor lse, Tensor delta, float scale, Tensor? bias=None) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)"
    ),
}

# The inference forward (CPU kernels only): the forward ops' arguments and results, called by the
# public function when no gradient can be taken, so that P V may round P to the input dtype
# (docs/serving.md). No backward op; no Triton twin.
INFER_SCHEMAS = {
    "attention_pool_infer": SCHEMAS["attention_pool_fwd"],
    "jagged_attention_pool_infer": SCHEMAS["jagged_attention_pool_fwd"],
}
# layout -> inference op
INFER_OPS = {"padded": "attention_pool_infer", "jagged": "jagged_attention_pool_infer"}

# DIN's activation-unit pooling (csrc/activation_unit_ops.cpp): one op pair for both layouts
# (offsets given = jagged). A Triton or other Python backend declares TRITON_PREFIX + name with
# the very same schema (tests/test_activation_unit.py compares the C++ ones with these).
ACTIVATION_SCHEMAS = {
    "activation_unit_pool_fwd": (
        "(Tensor query, Tensor key, Tensor? value, Tensor? lengths, Tensor? mask, Tensor? offsets, "
        "int max_length, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor w_out, Tensor b_out, "
        "Tensor? act1, Tensor? act2, str activation, bool softmax) -> (Tensor out, Tensor lse)"
    ),
    "activation_unit_pool_bwd": (
        "(Tensor grad_out, Tensor query, Tensor key, Tensor? value, Tensor? lengths, Tensor? mask, "
        "Tensor? offsets, int max_length, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, "
        "Tensor w_out, Tensor b_out, Tensor? act1, Tensor? act2, str activation, bool softmax, "
        "Tensor lse, Tensor delta) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, "
        "Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_w_out, "
        "Tensor grad_b_out, Tensor grad_act1, Tensor grad_act2)"
    ),
}
ACTIVATION_OPS = ("activation_unit_pool_fwd", "activation_unit_pool_bwd")
# The forward's arguments in order, and the differentiable ones in the order of the backward's
# gradients.
ACTIVATION_FWD_ARGS = ("query", "key", "value", "lengths", "mask", "offsets", "max_length", "w1",
                       "b1", "w2", "b2", "w_out", "b_out", "act1", "act2", "activation", "softmax")
ACTIVATION_GRAD_ARGS = ("query", "key", "value", "w1", "b1", "w2", "b2", "w_out", "b_out", "act1",
                        "act2")

# The fused attention weights (csrc/attention_weights_ops.cpp): a forward op per layout; the autograd
# in attnkern/ops/weights.py needs only the weights (torch ops on any device, the CPU backward op
# WEIGHTS_BWD_SCHEMAS below where it runs).
# A Triton or other Python backend declares TRITON_PREFIX + name with the very same schema.
WEIGHTS_SCHEMAS = {
    "attention_weights_fwd": (
        "(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, float scale, Tensor? bias=None) "
        "-> (Tensor weights, Tensor lse)"
    ),
    "jagged_attention_weights_fwd": (
        "(Tensor query, Tensor key, Tensor offsets, int max_length, float scale, Tensor? bias=None) "
        "-> (Tensor weights, Tensor lse)"
    ),
}
# layout -> weights op
WEIGHTS_OPS = {"padded": "attention_weights_fwd", "jagged": "jagged_attention_weights_fwd"}
# The activation unit's weights (attnkern/ops/activation_scores.py): the forward's arguments without
# value; no backward op of its own.
ACTIVATION_SCORES_SCHEMAS = {
    "activation_unit_scores_fwd": (
        "(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, Tensor? offsets, int max_length, "
        "Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor w_out, Tensor b_out, Tensor? act1, "
        "Tensor? act2, str activation, bool softmax) -> (Tensor scores, Tensor lse)"
    ),
}

# dq and dk of the weights from the weights and their gradients (dS = w (dW - sum_l dW w + dlse)
# formed inside; returned as grad_scores only with need_grad_scores, else empty), both layouts
# (offsets given = jagged), where a backend fuses them (the C++ CPU kernels); elsewhere the
# autograd forms them in torch ops.
WEIGHTS_BWD_SCHEMAS = {
    "attention_weights_bwd": (
        "(Tensor grad_weights, Tensor weights, Tensor? grad_lse, Tensor query, Tensor key, Tensor? lengths, "
        "Tensor? mask, Tensor? offsets, float scale, bool need_grad_scores=False) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_scores)"
    ),
}

# (forward op, backward op) per layout
LAYOUT_OPS = {
    "padded": ("attention_pool_fwd", "attention_pool_bwd"),
    "jagged": ("jagged_attention_pool_fwd", "jagged_attention_pool_bwd"),
}


def qualified(name: str) -> str:
    """"attnkern::<name>"."""
    return "%s::%s" % (NAMESPACE, name)


def argument_names(name: str) -> Tuple[str, ...]:
    """The argument names of op `name` (a key of SCHEMAS, INFER_SCHEMAS, ACTIVATION_SCHEMAS or
    ACTIVATION_SCORES_SCHEMAS), in order."""
    schemas = {**SCHEMAS, **INFER_SCHEMAS, **ACTIVATION_SCHEMAS, **ACTIVATION_SCORES_SCHEMAS}
    schema = torch._C.parse_schema(qualified(name) + schemas[name])
    return tuple(a.name for a in schema.arguments)
