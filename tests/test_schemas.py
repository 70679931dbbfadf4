"""The op schemas are declared once: the C++ ops' schemas (csrc/attention_pool_ops.cpp) as the dispatcher
parsed them match attnkern/ops/schemas.py, and so do the Triton ops declared from it."""

import pytest
import torch

import attnkern
from attnkern.ops.schemas import SCHEMAS, TRITON_PREFIX, argument_names, qualified


def _parts(schema):
    """(arguments, returns) of a FunctionSchema as (name, type, default) triples."""
    def triple(a):
        return (a.name, str(a.type), None if a.default_value is None else repr(a.default_value))
    return [triple(a) for a in schema.arguments], [triple(r) for r in schema.returns]


def _declared(name):
    return torch._C.parse_schema(qualified(name) + SCHEMAS[name])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cpp_schema_matches_the_declaration(name):
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    cpp = getattr(torch.ops.attnkern, name).default._schema
    assert _parts(cpp) == _parts(_declared(name))
    assert str(cpp) == qualified(name) + SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_triton_schema_matches_the_cpp_schema(name):
    pytest.importorskip("triton")
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    from attnkern.ops import triton as _  # noqa: F401  (registers attnkern::triton_*)

    cpp = getattr(torch.ops.attnkern, name).default._schema
    tri = getattr(torch.ops.attnkern, TRITON_PREFIX + name).default._schema
    assert tri.name == qualified(TRITON_PREFIX + name)
    assert _parts(tri) == _parts(cpp)
    assert str(tri) == qualified(TRITON_PREFIX + name) + str(cpp)[len(qualified(name)):]


def test_argument_names_come_from_the_schemas():
    assert argument_names("attention_pool_fwd") == ("query", "key", "value", "lengths", "mask",
                                                    "scale", "bias")
    assert argument_names("jagged_attention_pool_bwd")[4:6] == ("offsets", "max_length")
