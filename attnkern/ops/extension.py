"""The C++ ops (attnkern::attention_pool_fwd etc., declared in csrc/attention_pool_ops.cpp, kernels in
csrc/cpu and csrc/cuda; attnkern::activation_unit_pool_fwd/_bwd and activation_unit_scores_fwd in
csrc/activation_unit_ops.cpp): importing this module loads attnkern._C and gives its ops their fake
impls and autograd. EXTENSION_OPS says whether the extension is there."""

from __future__ import annotations

import importlib

import torch

from .autograd import register_activation_fakes_and_autograd, register_fakes_and_autograd, register_infer_fakes
from . import quant, topk
from .activation_scores import register_scores
from .availability import CUDA_EMU_PREFIX, cuda_emulated, extension
from .schemas import ACTIVATION_SCHEMAS, ACTIVATION_SCORES_SCHEMAS, SCHEMAS, WEIGHTS_SCHEMAS, qualified
from .sequence import SEQUENCE_SCHEMAS, register_sequence_fakes_and_autograd
from .weights import register_weights_fakes_and_autograd


def _cxx_schema(name: str) -> str:
    """The schema (arguments and results) of attnkern::<name> as the C++ extension declared it."""
    return str(getattr(torch.ops.attnkern, name).default._schema).split(name, 1)[1]


def _register_cuda_emulation() -> None:
    """The CUDA emulation build: attnkern::cuda_emu_<op>, declared here with the C++ ops' schemas,
    get their CPU kernels (the CUDA launchers through the harness) when attnkern._cuda_emu loads."""
    cxx_only = {name: _cxx_schema(name) for name in (quant.QUANT_FWD, topk.TOPK_OP)}
    for name, schema in {**SCHEMAS, **ACTIVATION_SCHEMAS, **ACTIVATION_SCORES_SCHEMAS, **SEQUENCE_SCHEMAS,
                         **WEIGHTS_SCHEMAS, **cxx_only}.items():
        torch.library.define(qualified(CUDA_EMU_PREFIX + name), schema)
    importlib.import_module("attnkern._cuda_emu")
    register_fakes_and_autograd(CUDA_EMU_PREFIX)
    register_activation_fakes_and_autograd(CUDA_EMU_PREFIX)
    register_scores(CUDA_EMU_PREFIX)
    register_sequence_fakes_and_autograd(CUDA_EMU_PREFIX)
    quant.register(CUDA_EMU_PREFIX)
    topk.register_topk_fake(CUDA_EMU_PREFIX)
    register_weights_fakes_and_autograd(CUDA_EMU_PREFIX)


def _register() -> bool:
    mod, _ = extension()
    if mod is None:
        return False
    register_fakes_and_autograd("")
    register_infer_fakes()
    register_activation_fakes_and_autograd("")
    register_scores("")
    quant.register()
    if cuda_emulated():
        _register_cuda_emulation()
    return True


EXTENSION_OPS = _register()
