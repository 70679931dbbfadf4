"""`attnkern bench` providers: each a callable running one case (attnkern's backends, SDPA,
torch.compile, FlexAttention, FBGEMM's jagged operators, and the machine's limit for the same
bytes)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .cases import Case, Inputs, Oracle, bytes_moved, flops, make_inputs, make_oracle

# ----------------------------------------------------------------------------------------------
# Providers


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


def provider_status(provider: str, device) -> Optional[str]:
    """None when `provider` can run on `device`, else the reason why not."""
    import attnkern

    dev = torch.device(device).type
    if provider in ("reference", "sdpa", "compile"):
        return None
    if provider == "flex":
        if dev != "cuda":
            return "FlexAttention is benchmarked on CUDA only"
        try:
            # Imported only to learn whether this torch has FlexAttention.
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except ImportError as e:
            return "torch has no FlexAttention (%s)" % e
        return None
    if provider in FBGEMM_PROVIDERS:
        return _fbgemm_status()
    if provider not in attnkern.backends():
        return "unknown provider %r" % provider
    info = attnkern.backends()[provider]
    if not info.available:
        return info.reason
    if provider == "cpu" and dev != "cpu":
        return "the cpu backend runs on CPU tensors"
    if provider in ("cuda", "triton") and dev != "cuda":
        # Triton under TRITON_INTERPRET=1 is a correctness tool, never timed.
        return "the %s backend is benchmarked on CUDA tensors only" % provider
    return None


def _pool_fn(inp: Inputs, backend: str) -> Callable:
    import attnkern

    L, bias = inp.case.shape.L, inp.bias
    if inp.offsets is not None:
        offsets = inp.offsets

        def fn(q, k, v):
            return attnkern.attention_pool(q, k, v, offsets=offsets, max_length=L, bias=bias, backend=backend)
    else:
        lengths = inp.lengths

        def fn(q, k, v):
            return attnkern.attention_pool(q, k, v, lengths, bias=bias, backend=backend)
    return fn


def _padded_view(inp: Inputs):
    """(k, v) -> padded key/value [B, L, H, D] and a [B, L] validity mask. For the jagged layout
    the gather runs inside the timed call: it is what a padded-only library costs a jagged user."""
    from attnkern.reference import jagged_to_padded, lengths_to_mask

    L = inp.case.shape.L
    if inp.offsets is not None:
        offsets = inp.offsets

        def to_padded(k, v):
            return jagged_to_padded(k, v, offsets, L)
    else:
        mask = lengths_to_mask(inp.lengths, L)

        def to_padded(k, v):
            return k, v, mask
    return to_padded


def _sdpa_fn(inp: Inputs) -> Callable:
    import torch.nn.functional as F

    to_padded = _padded_view(inp)
    bias = inp.bias

    def fn(q, k, v):
        kp, vp, valid = to_padded(k, v)
        # [B, N, H, D] -> [B, H, N, D] as transpose views (no copy of our own); mask [B, 1, 1, L],
        # True = attend. A fully masked row (length 0) gives NaN in SDPA: harmless for timing,
        # and the correctness check compares non-empty rows only. A bias goes in as a float
        # mask [B, H, 1, L], -inf at the padding, formed in the timed call as a user would.
        mask = valid[:, None, None, :]
        if bias is not None:
            mask = torch.where(valid[:, None, :], bias, float("-inf"))[:, :, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    return fn


# One torch.compile wrapper per provider for the whole run, never reset: a shape (with its
# dtype and layout) compiles once, and its fwd and fwd+bwd cases share the forward graph
# (a run of many cases used to reset and recompile per case: minutes of inductor on a GPU).
# The recompile limit is raised so that a long run's shapes all stay compiled.
_COMPILED: dict = {}
_RECOMPILE_LIMIT = 256


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):  # the name differs across torch
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), _RECOMPILE_LIMIT))
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _compile_fn(inp: Inputs) -> Callable:
    from attnkern.reference import attention_pool_ref

    compiled = _compiled("compile", attention_pool_ref)
    L, bias = inp.case.shape.L, inp.bias
    if inp.offsets is not None:
        offsets = inp.offsets

        def fn(q, k, v):
            return compiled(q, k, v, offsets=offsets, max_length=L, bias=bias)[0]
    else:
        lengths = inp.lengths

        def fn(q, k, v):
            return compiled(q, k, v, lengths, bias=bias)[0]
    return fn


def _flex_fn(inp: Inputs) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = inp.case.shape
    flex = _compiled("flex", flex_attention)
    lengths = inp.lengths
    to_padded = _padded_view(inp)

    def length_mask(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    # Built once outside the timed call (a model would build it once per batch).
    block_mask = create_block_mask(length_mask, s.B, None, s.N, s.L, device=inp.device)

    def fn(q, k, v):
        kp, vp, _ = to_padded(k, v)
        out = flex(q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)
    return fn


FBGEMM_PROVIDERS = ("fbgemm", "fbgemm_bmm")


def _fbgemm_status() -> Optional[str]:
    from attnkern.tools._fbgemm import status_with

    return status_with("fbgemm_gpu.sll")  # importing it registers the torch.ops.fbgemm.sll_* ops


def _fbgemm_fn(inp: Inputs, provider: str) -> Callable:
    """FBGEMM's sll operators on the case: the jagged side is the history ([T, D] keys and
    values), the dense side the queries ([B, Dk, N], pre-scaled: the operators have no scale),
    and the softmax runs over each row's positions; the operators have no head dim, so heads
    run one after another. "fbgemm" is sll_jagged_dense_flash_attention (with a zero [B, L, N]
    bias, its required argument); "fbgemm_bmm" the three operators a user would chain."""
    s = inp.case.shape
    if inp.offsets is None:
        raise Unavailable("FBGEMM's jagged attention takes the jagged layout")
    ops = torch.ops.fbgemm
    offsets, L, scale = inp.offsets, s.L, s.Dk ** -0.5
    bias = torch.zeros(s.B, L, s.N, dtype=inp.query.dtype, device=inp.device)

    def head(qd, kj, vj):
        if provider == "fbgemm":
            return ops.sll_jagged_dense_flash_attention(kj, qd, vj, bias, offsets, L, False)
        p = ops.sll_jagged_softmax(ops.sll_jagged_dense_bmm(kj, qd, offsets, L, False), offsets, L)
        return ops.sll_jagged_jagged_bmm(p, vj, offsets, L, False)  # [B, N, Dv]

    def fn(q, k, v):
        qd = (q * scale).permute(2, 0, 3, 1)  # [H, B, Dk, N]
        return torch.stack([head(qd[h], k[:, h], v[:, h]) for h in range(s.H)], dim=2)
    return fn


def forward_fn(provider: str, inp: Inputs) -> Callable:
    """f(q, k, v) -> out [B, N, H, Dv] for one provider; raises Unavailable."""
    why = provider_status(provider, inp.device)
    if why is not None:
        raise Unavailable(why)
    if provider == "sdpa":
        return _sdpa_fn(inp)
    if provider == "compile":
        return _compile_fn(inp)
    if inp.bias is not None and (provider == "flex" or provider in FBGEMM_PROVIDERS):
        raise Unavailable("%s is not benchmarked with a score bias" % provider)
    if provider == "flex":
        return _flex_fn(inp)
    if provider in FBGEMM_PROVIDERS:
        return _fbgemm_fn(inp, provider)
    return _pool_fn(inp, provider)


def make_callable(provider: str, inp: Inputs) -> Callable:
    """A no-argument callable running the case's mode: fwd returns out; fwd+bwd returns
    (out, dq, dk, dv) through torch.autograd.grad (no .grad accumulation between runs)."""
    f = forward_fn(provider, inp)
    if inp.case.mode == "fwd":
        q, k, v = inp.query, inp.key, inp.value
        return lambda: f(q, k, v)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (inp.query, inp.key, inp.value))
    go = inp.grad_out

    def fwd_bwd():
        out = f(q, k, v)
        return (out,) + torch.autograd.grad(out, (q, k, v), go)
    return fwd_bwd


# Total bytes the limit measurement rotates through: several times the last-level cache (32 MB
# L3 on the CPU machine here, 50-60 MB L2 on A100/H100/H200), so that every timed call reads
# from memory. A single buffer re-read in a loop would time the cache instead.
_ROTATE_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def limit_callable(nbytes: int, device) -> Callable:
    """Moves `nbytes` once at the machine's best: CPU reads them (sum over a float32 buffer),
    CUDA copies half of them device to device (read + write = nbytes). Each call uses the next
    of several buffers whose total exceeds the caches, so the time is a memory time."""
    device = torch.device(device)
    copies = max(1, min(64, -(-_ROTATE_BYTES.get(device.type, 0) // max(nbytes, 1))))
    if device.type == "cuda":
        pairs = []
        for _ in range(copies):
            src = torch.ones(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
            pairs.append((src, torch.empty_like(src)))
        ring = itertools.cycle(pairs)

        def copy():
            src, dst = next(ring)
            return dst.copy_(src)
        return copy
    bufs = itertools.cycle([torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
                            for _ in range(copies)])
    return lambda: next(bufs).sum()



@dataclass
class CaseSetup:
    """Everything one case needs: inputs, oracle, byte/FLOP counts and a callable per provider."""

    case: Case
    inputs: Inputs
    nbytes: int
    nflops: int
    _oracle: Optional[Oracle] = field(default=None, repr=False)

    @property
    def oracle(self) -> Oracle:
        if self._oracle is None:
            self._oracle = make_oracle(self.inputs)
        return self._oracle

    def callable(self, provider: str) -> Callable:
        """The timed callable of `provider` ("limit" = the machine's limit); raises Unavailable."""
        if provider == "limit":
            return limit_callable(self.nbytes, self.inputs.device)
        return make_callable(provider, self.inputs)

    def check(self, outputs) -> tuple:
        """(ok, err) of a provider's outputs against the float64 oracle: within the rule of
        attnkern.testing, and the largest error relative to the oracle's magnitude."""
        return self.oracle.compare(outputs)


def setup_case(case: Case, device="cpu") -> CaseSetup:
    inp = make_inputs(case, device)
    return CaseSetup(case, inp, bytes_moved(case, inp.total_len), flops(case, inp.total_len))
