"""One contract per op, held in two places (docs/contract.md): the public API's checks
(attnkern/_validation.py) and the registered ops' checks (csrc/*_checks.cpp, mirrored for the
fake impls in attnkern/ops/checks.py). The same bad calls go through the public function, the
raw torch.ops call and the op's fake impl under FakeTensorMode: each is a clear error naming the
argument, never a crash, and the fake impl's error is the kernel's; the Triton twin of each op
too where Triton runs. The size limits of the C++
and the Python side agree."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attnkern
from attnkern import limits
from attnkern.testing import random_activation_problem, to_public

needs_ext = pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
ops = torch.ops.attnkern


@needs_ext
def test_limits_agree_between_cpp_and_python():
    from attnkern import _C

    assert (_C.MAX_HEAD_DIM, _C.MAX_UNITS) == (limits.MAX_HEAD_DIM, limits.MAX_UNITS)


# ---- the bad calls ------------------------------------------------------------------------------
# Each case: (op arguments of a valid call -> those of a bad one, words the public error names,
# words the raw op's error names, whether only a read of lengths/offsets values can tell).


def _pool_args(layout):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in ((2, 3, 2, 8), (2, 5, 2, 8), (2, 5, 2, 4)))
    if layout == "padded":
        return dict(query=q, key=k, value=v, lengths=torch.tensor([5, 2]), mask=None, scale=0.5)
    return dict(query=q, key=k.flatten(0, 1)[:7], value=v.flatten(0, 1)[:7], offsets=torch.tensor([0, 3, 7]),
                max_length=-1, scale=0.5)


def _with(**changes):
    return lambda a: dict(a, **changes)


def _wide(a, d):
    """query and key with head dim d."""
    return dict(a, query=a["query"][..., :1].expand(*a["query"].shape[:-1], d),
                key=a["key"][..., :1].expand(*a["key"].shape[:-1], d))


POOL = {
    "key_dtype": ("padded", lambda a: dict(a, key=a["key"].double()), "key", "key"),
    "key_head_dim": ("padded", lambda a: dict(a, key=a["key"][..., :4]), "key", "key"),
    "value_length": ("padded", lambda a: dict(a, value=a["value"][:, :3]), "value", "value"),
    "head_dim_limit": ("padded", lambda a: _wide(a, limits.MAX_HEAD_DIM + 1), "Dk", "Dk"),
    "value_head_dim_limit": ("padded", lambda a: dict(a, value=a["value"][..., :1].expand(2, 5, 2, 300)),
                             "Dv", "Dv"),
    "lengths_dtype": ("padded", lambda a: dict(a, lengths=a["lengths"].float()), "lengths", "lengths"),
    "lengths_shape": ("padded", lambda a: dict(a, lengths=a["lengths"][:1]), "lengths", "lengths"),
    "mask_dtype": ("padded", _with(lengths=None, mask=torch.ones(2, 5, dtype=torch.int32)), "mask", "mask"),
    "mask_shape": ("padded", _with(lengths=None, mask=torch.ones(2, 4, dtype=torch.bool)), "mask", "mask"),
    "lengths_and_mask": ("padded", _with(mask=torch.ones(2, 5, dtype=torch.bool)), "mask", "mask"),
    "scale": ("padded", _with(scale=float("nan")), "scale", "scale"),
    "key_sparse": ("padded", lambda a: dict(a, key=a["key"].to_sparse()), "key", "key"),
    "key_nested": ("padded", lambda a: dict(a, key=torch.nested.nested_tensor(list(a["key"]))), "key", "key"),
    "lengths_too_long": ("padded", _with(lengths=torch.tensor([6, 2])), "lengths", "lengths", True),
    "lengths_negative": ("padded", _with(lengths=torch.tensor([-1, 2])), "lengths", "lengths", True),
    "offsets_shape": ("jagged", lambda a: dict(a, offsets=a["offsets"][:2]), "offsets", "offsets"),
    "offsets_dtype": ("jagged", lambda a: dict(a, offsets=a["offsets"].float()), "offsets", "offsets"),
    "jagged_value": ("jagged", lambda a: dict(a, value=a["value"][:3]), "value", "value"),
    "max_length": ("jagged", _with(max_length=-2), "max_length", "max_length"),
    "offsets_decreasing": ("jagged", _with(offsets=torch.tensor([0, 5, 3])), "offsets", "offsets", True),
    "offsets_past_t": ("jagged", _with(offsets=torch.tensor([0, 3, 9])), "offsets", "offsets", True),
    "row_past_max_length": ("jagged", _with(max_length=2), "max_length", "max_length", True),
    # The score bias: the same tensor is a valid public shape and a valid op shape but for the
    # defect ([B, Nb, Hb, L] / [T, Nb, Hb] with Nb = 1 is also the public per-query form).
    "bias_dtype": ("padded", _with(bias=torch.zeros(2, 1, 2, 5, dtype=torch.float64)), "bias", "bias"),
    "bias_queries": ("padded", _with(bias=torch.zeros(2, 2, 2, 5)), "bias", "bias"),
    "bias_heads": ("padded", _with(bias=torch.zeros(2, 1, 3, 5)), "bias", "bias"),
    "bias_length": ("padded", _with(bias=torch.zeros(2, 1, 2, 4)), "bias", "bias"),
    "bias_sparse": ("padded", _with(bias=torch.zeros(2, 1, 2, 5).to_sparse()), "bias", "bias"),
    "bias_jagged_rows": ("jagged", _with(bias=torch.zeros(6, 1, 2)), "bias", "bias"),
    "bias_jagged_rank": ("jagged", _with(bias=torch.zeros(7, 1, 2, 1)), "bias", "bias"),
}


def _au_args(layout="lengths", E=4):
    return dict(random_activation_problem(B=3, N=2, L=6, E=E, Dv=3, units=(5, 3), activation="dice",
                                          layout=layout, seed=0))


AU = {
    "key_dtype": ("lengths", lambda a: dict(a, key=a["key"].double()), "key", "key"),
    "value_length": ("lengths", lambda a: dict(a, value=a["value"][:, :2]), "value", "value"),
    "embedding_dim_limit": ("lengths", lambda a: _au_args(E=limits.MAX_UNITS + 1), "E", "E"),
    "w1_shape": ("lengths", lambda a: dict(a, w1=a["w1"][:, :-1]), "weights[0] weight", "w1"),
    "b1_shape": ("lengths", lambda a: dict(a, b1=a["b1"][:-1]), "weights[0] bias", "b1"),
    "w_out_dtype": ("lengths", lambda a: dict(a, w_out=a["w_out"].double()), "weights[2] weight", "w_out"),
    "activation": ("lengths", _with(activation="tanh"), "activation", "activation"),
    "act1_missing": ("lengths", _with(act1=None, act2=None), "activation_params", "act1"),
    "act1_shape": ("lengths", lambda a: dict(a, act1=a["act1"][:2]), "activation_params[0]", "act1"),
    "lengths_dtype": ("lengths", lambda a: dict(a, lengths=a["lengths"].float()), "lengths", "lengths"),
    "mask_shape": ("mask", lambda a: dict(a, mask=a["mask"][:, :-1]), "mask", "mask"),
    "w1_sparse": ("lengths", lambda a: dict(a, w1=a["w1"].to_sparse()), "weights[0] weight", "w1"),
    "key_nested": ("lengths", lambda a: dict(a, key=torch.nested.nested_tensor(list(a["key"]))), "key", "key"),
    "offsets_shape": ("jagged", lambda a: dict(a, offsets=a["offsets"][:-1]), "offsets", "offsets"),
    "lengths_too_long": ("lengths", lambda a: dict(a, lengths=torch.full_like(a["lengths"], 7)), "lengths",
                         "lengths", True),
    "offsets_decreasing": ("jagged", lambda a: dict(a, offsets=a["offsets"].flip(0)), "offsets", "offsets",
                           True),
}


def _case(table, name):
    layout, change, public_words, raw_words, *values = table[name]
    return layout, change, public_words, raw_words, bool(values and values[0])


def _pool_public(a):
    kw = dict(scale=a["scale"], bias=a.get("bias"))
    if "offsets" in a:
        kw.update(offsets=a["offsets"], max_length=None if a["max_length"] == -1 else a["max_length"])
    else:
        kw.update(mask=a["mask"])
    return lambda: attnkern.attention_pool(a["query"], a["key"], a["value"], a.get("lengths"), **kw)


def _pool_raw(a):
    bias = [a["bias"]] if "bias" in a else []
    if "offsets" in a:
        return "jagged_attention_pool_fwd", [a[n] for n in ("query", "key", "value", "offsets", "max_length",
                                                               "scale")] + bias
    return "attention_pool_fwd", [a[n] for n in ("query", "key", "value", "lengths", "mask", "scale")] + bias


def _au_public(a):
    args, kw = to_public(a)
    return lambda: attnkern.activation_unit_pool(*args, **kw)


def _au_raw(a):
    return "activation_unit_pool_fwd", list(a.values())


def _names_in(error, words):
    first = str(error.value).split("\n")[0]
    assert words in first, first


def _fake(args):
    """args with every dense tensor a FakeTensor, and the mode to call with (None where a
    sparse or nested tensor, which FakeTensorMode cannot hold, stays real)."""
    if any(isinstance(t, torch.Tensor) and (t.is_nested or t.layout != torch.strided) for t in args):
        return None, args
    mode = FakeTensorMode()
    return mode, [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]


def _triton_ops():
    """Whether the Triton ops run here (on CPU tensors: TRITON_INTERPRET=1, set by conftest.py)."""
    if not attnkern.backends()["triton"].available:
        return False
    importlib.import_module("attnkern.ops.triton")  # declares the attnkern::triton_* ops
    return True


def _drive(public, name, args, public_words, raw_words, reads_values):
    with pytest.raises((ValueError, TypeError)) as e:
        public()
    _names_in(e, public_words)
    op = getattr(ops, name)
    with pytest.raises((ValueError, TypeError, RuntimeError)) as real:
        op(*args)
    _names_in(real, raw_words)
    assert str(real.value).startswith("attnkern: ")
    if _triton_ops():
        # The Triton twin: the activation unit's with the C++ op's very checks; the attention
        # pool's with the public API's, prefixed as the ops' are.
        with pytest.raises((ValueError, TypeError)) as twin:
            getattr(ops, "triton_" + name)(*args)
        _names_in(twin, raw_words)
        assert str(twin.value).startswith("attnkern: ")
        if name.startswith("activation_unit"):
            assert str(twin.value).split("\n")[0] == str(real.value).split("\n")[0]
    mode, fake_args = _fake(args)
    if mode is None:
        return
    with mode:
        if reads_values:
            # Metadata alone cannot tell: the fake impl gives the output's metadata.
            out, lse = op(*fake_args)
            assert out.shape[:2] == args[0].shape[:2]
        else:
            with pytest.raises(type(real.value)) as fake:
                op(*fake_args)
            assert str(fake.value).split("\n")[0] == str(real.value).split("\n")[0]


PATHS = {"attention_pool": (POOL, _pool_args, _pool_public, _pool_raw),
         "activation_unit_pool": (AU, _au_args, _au_public, _au_raw)}


@needs_ext
@pytest.mark.parametrize("op,name", [(op, name) for op, (table, *_) in PATHS.items() for name in sorted(table)])
def test_bad_call_on_every_path(op, name):
    table, valid_args, public, raw = PATHS[op]
    layout, change, public_words, raw_words, reads_values = _case(table, name)
    a = change(valid_args(layout))
    _drive(public(a), *raw(a), public_words, raw_words, reads_values)


# ---- the backward ops' own inputs (no public call reaches them malformed) -----------------------


def _bwd_calls():
    a = _pool_args("padded")
    q = a["query"]
    go, lse = torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2)
    pool = [q, a["key"], a["value"], a["lengths"], None]
    u = _au_args()
    uo, ul = torch.zeros(3, 2, 3), torch.zeros(3, 2)
    return {
        "pool_grad_out": (ops.attention_pool_bwd, [go[..., :2]] + pool + [lse, lse, 0.5], "grad_out"),
        "pool_lse_dtype": (ops.attention_pool_bwd, [go] + pool + [lse.double(), lse, 0.5], "lse"),
        "pool_delta_shape": (ops.attention_pool_bwd, [go] + pool + [lse, lse[:1], 0.5], "delta"),
        "pool_bias_shape": (ops.attention_pool_bwd, [go] + pool + [lse, lse, 0.5, torch.zeros(2, 1, 2, 6)], "bias"),
        "au_grad_out": (ops.activation_unit_pool_bwd, [uo[:, :1]] + list(u.values()) + [ul, ul], "grad_out"),
        "au_lse_dtype": (ops.activation_unit_pool_bwd, [uo] + list(u.values()) + [ul.double(), ul], "lse"),
        "au_delta_shape": (ops.activation_unit_pool_bwd, [uo] + list(u.values()) + [ul, ul[:, :1]], "delta"),
    }


@needs_ext
@pytest.mark.parametrize("name", sorted(_bwd_calls()))
def test_backward_op_bad_call_raw_and_fake(name):
    op, args, words = _bwd_calls()[name]
    with pytest.raises((ValueError, TypeError)) as real:
        op(*args)
    _names_in(real, words)
    mode, fake_args = _fake(args)
    with mode, pytest.raises(type(real.value)) as fake:
        op(*fake_args)
    assert str(fake.value).split("\n")[0] == str(real.value).split("\n")[0]
