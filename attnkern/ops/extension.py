"""The C++ ops (attnkern::attention_pool_fwd etc., declared in csrc/attention_pool_ops.cpp, kernels in
csrc/cpu and csrc/cuda; attnkern::activation_unit_pool_fwd/_bwd in csrc/activation_unit_ops.cpp): importing this module loads attnkern._C and gives its ops their fake
impls and autograd. EXTENSION_OPS says whether the extension is there."""

from __future__ import annotations

from .autograd import register_activation_fakes_and_autograd, register_fakes_and_autograd
from .availability import extension


def _register() -> bool:
    mod, _ = extension()
    if mod is None:
        return False
    register_fakes_and_autograd("")
    register_activation_fakes_and_autograd("")
    return True


EXTENSION_OPS = _register()
