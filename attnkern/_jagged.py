"""TorchRec histories: a `torchrec.JaggedTensor` passed as the keys (or values) of the pooling
is unpacked into attnkern's jagged layout, values [T, ...] + offsets [B+1], without a copy.

TorchRec is recognised by duck typing, never imported: the core must load (and stay cheap)
without it, and an installed but mismatched FBGEMM must not break ``import attnkern``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def is_jagged_tensor(x) -> bool:
    """Whether `x` looks like a torchrec.JaggedTensor: values() with lengths()/offsets()."""
    if x is None or isinstance(x, torch.Tensor):
        return False
    return all(callable(getattr(x, m, None)) for m in ("values", "lengths", "offsets"))


def _offsets(jt, name: str) -> torch.Tensor:
    get = getattr(jt, "offsets_or_none", None)
    offsets = get() if get is not None else None
    if offsets is None:
        # Computed here rather than by jt.offsets(), which needs FBGEMM's cumsum op; the offsets
        # keep the lengths' dtype (int32 or int64), which the kernels take as they are.
        lengths = jt.lengths()
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
            raise ValueError("%s: a JaggedTensor's lengths must be a 1-D tensor" % name)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=lengths.dtype)])
    return offsets


def _unpack(jt, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if callable(getattr(jt, "keys", None)):
        raise TypeError(
            "%s must be a tensor or a torchrec JaggedTensor, got a %s: pass one feature of it, "
            "e.g. kjt.to_dict()[feature] or kjt[feature]" % (name, type(jt).__name__))
    return jt.values(), _offsets(jt, name)


def unpack_history(key, value, offsets: Optional[torch.Tensor], names=("key", "value"), **layout):
    """(key, value, offsets) with any JaggedTensor among key/value replaced by its values() and
    its offsets passed on. `layout` holds the other layout arguments of the call (lengths, mask,
    ...): with a JaggedTensor, each of them and `offsets` must be None, since it carries its own.
    Plain tensors come back unchanged."""
    jk, jv = is_jagged_tensor(key), is_jagged_tensor(value)
    if not (jk or jv):
        return key, value, offsets
    which = names[0] if jk else names[1]
    given = [n for n, x in (("offsets", offsets),) + tuple(layout.items()) if x is not None]
    if given:
        raise ValueError(
            "%s is a JaggedTensor, which carries its own offsets; got %s too: pass either the "
            "JaggedTensor alone or its values() with offsets=" % (which, ", ".join(given)))
    if jk:
        key, offsets = _unpack(key, names[0])
    if jv:
        value, value_offsets = _unpack(value, names[1])
        if offsets is None:
            offsets = value_offsets
        elif value_offsets is not offsets and not (
                value_offsets.shape == offsets.shape and torch.equal(value_offsets.to(offsets), offsets)):
            raise ValueError("%s and %s are JaggedTensors with different offsets; they must "
                             "describe the same rows" % names)
    return key, value, offsets
