"""The op schemas on the Python side, declared once.

The C++ ops (csrc/ops.cpp, TORCH_LIBRARY(attnkern)) are the source of truth; the Triton ops
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
        "(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, float scale) "
        "-> (Tensor out, Tensor lse)"
    ),
    "attention_pool_bwd": (
        "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
        "Tensor lse, Tensor delta, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
    ),
    "jagged_attention_pool_fwd": (
        "(Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, float scale) "
        "-> (Tensor out, Tensor lse)"
    ),
    "jagged_attention_pool_bwd": (
        "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, "
        "Tensor lse, Tensor delta, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
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
    """The argument names of op `name` (a key of SCHEMAS), in order."""
    schema = torch._C.parse_schema(qualified(name) + SCHEMAS[name])
    return tuple(a.name for a in schema.arguments)
