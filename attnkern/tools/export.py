"""`attnkern export`: a model for serving without its Python code.

Two formats:

- ``aoti``: `torch.export` (dynamic batch, candidates and history length) and an
  AOTInductor package (``.pt2``), whose graph calls attnkern's fused ops through the
  dispatcher. A serving process loads the package and attnkern's op library, nothing else
  (``torch.ops.load_library`` of ``attnkern/_C*.so`` in Python; in C++ a ``dlopen`` of it
  before ``torch::inductor::AOTIModelPackageLoader`` runs: examples/serve_aoti.cpp).
- ``onnx``: ``torch.onnx.export`` with attnkern's ops translated to standard ONNX ops
  (`attnkern.ops.onnx_translation`): any ONNX runtime runs it, with its own kernels.

``--check`` reloads the export in a fresh process (`serve_check.py`, which imports only torch
or onnxruntime) on inputs of two shapes other than the export's example, and compares with
eager.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models import TargetAttentionCTR
from ..nn import AttentionPooling
from ..testing import edge_lengths
from ._args import check_heads_divide, check_writable_file, int_at_least

MODELS = ("attention_pooling", "target_attention_ctr")
FORMATS = ("aoti", "onnx")
EXPORTERS = ("dynamo", "torchscript")
SERVE_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_check.py")

# Eager against the export, float32: a different summation order (Inductor's fused GEMMs,
# onnxruntime's MatMul) moves the last few bits; a wrong mask or scale moves whole digits.
ATOL, RTOL = 1e-5, 1e-4


@dataclass
class ModelConfig:
    """The model that is exported (random weights unless a training checkpoint is given)."""

    model: str = "target_attention_ctr"
    embed_dim: int = 32
    num_heads: int = 2
    num_items: int = 1000
    mlp_dims: Tuple[int, ...] = (64, 32)
    checkpoint: Optional[str] = None
    seed: int = 0
    time_buckets: int = 0  # target_attention_ctr: the attention's time table (0: none)
    recency_buckets: int = 0  # and its recency table


@dataclass
class Shape:
    batch: int
    candidates: int
    history: int


EXAMPLE = Shape(3, 4, 7)  # the traced example: no size 0 or 1 (torch.export specialises those)
CHECK_SHAPES = (Shape(1, 5, 11), Shape(6, 1, 3))  # serving's B = 1; another B and L, one candidate


def example_shape(shape: Shape) -> Shape:
    """The shape the export traces for a requested example: sizes below 2 raised to 2 (torch.export
    specialises sizes 0 and 1, which would pin that axis). Every axis stays dynamic either way;
    the example's candidates and history length choose AttentionPooling's evaluation order
    under absorb="auto" (absorbed for few candidates, projected for many), the one order the
    exported graph then holds: give the shape you serve."""
    return Shape(*(max(2, int(x)) for x in (shape.batch, shape.candidates, shape.history)))


@dataclass
class Inputs:
    """One call of a serving model: positional args then keyword args (the flat order a
    C++ caller passes), and their names (the ONNX graph's input names)."""

    args: Tuple[torch.Tensor, ...]
    kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)
    names: Tuple[str, ...] = ()

    def flat(self) -> List[torch.Tensor]:
        return list(self.args) + list(self.kwargs.values())


class CheckpointError(ValueError):
    """The --checkpoint file is missing or is not an `attnkern train` checkpoint."""


def load_checkpoint(path: str) -> Tuple[dict, dict]:
    """(the model's state dict, the run's config) of an `attnkern train` checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError("no such file: %r" % path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file: pickle, zip and torch each raise their own
        raise CheckpointError("%r is not a checkpoint of `attnkern train` (%s)" % (path, e)) from None
    state = ckpt.get("best_model") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "embedding.weight" not in state:
        raise CheckpointError("%r is not a checkpoint of `attnkern train` (no TargetAttentionCTR "
                              "weights in it)" % path)
    return state, ckpt.get("config", {})


def build_model(cfg: ModelConfig) -> nn.Module:
    """The eval-mode model of `cfg` on the CPU (fused "cpu" backend when it is built)."""
    if cfg.model not in MODELS:
        raise ValueError("model must be one of %s, got %r" % (", ".join(MODELS), cfg.model))
    torch.manual_seed(cfg.seed)
    if cfg.model == "attention_pooling":
        if cfg.checkpoint is not None:
            raise ValueError("--checkpoint is for target_attention_ctr (a training checkpoint)")
        if cfg.time_buckets or cfg.recency_buckets:
            raise ValueError("time and recency tables are for target_attention_ctr")
        model = AttentionPooling(cfg.embed_dim, cfg.num_heads)
        # Non-zero biases, so that a dropped bias cannot go unnoticed by the checks.
        with torch.no_grad():
            for proj in (model.q_proj, model.k_proj, model.v_proj, model.out_proj):
                proj.bias.normal_(0.0, 0.1)
        return model.eval()
    if cfg.checkpoint is None:
        model = TargetAttentionCTR(cfg.num_items, cfg.embed_dim, cfg.num_heads,
                                   mlp_dims=cfg.mlp_dims, time_buckets=cfg.time_buckets or None,
                                   recency_buckets=cfg.recency_buckets or None)
        # Random table entries (they start at zero), so that a dropped bias fails the checks.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_bias_weight"):
                    p.normal_(0.0, 1.0)
        return model.eval()
    if cfg.time_buckets or cfg.recency_buckets:
        raise ValueError("--time-bias / --recency-bias size a random model; a checkpoint brings "
                         "its own tables")
    state, conf = load_checkpoint(cfg.checkpoint)
    model = TargetAttentionCTR(
        state["embedding.weight"].shape[0],
        embed_dim=conf.get("embed_dim", cfg.embed_dim),
        num_heads=conf.get("num_heads", cfg.num_heads),
        mlp_dims=tuple(conf.get("mlp_dims", cfg.mlp_dims)),
        pooling=conf.get("pooling", "attention"),
        time_buckets=conf.get("time_buckets") or None,
        recency_buckets=conf.get("recency_buckets") or None,
    )
    model.load_state_dict(state)
    return model.eval()


def make_inputs(model: nn.Module, shape: Shape, seed: int = 0, lengths=None) -> Inputs:
    """Random inputs of `shape` for `model`; row lengths cycle through full, about half,
    nearly full, empty and one (`edge_lengths`) unless given."""
    g = torch.Generator().manual_seed(seed)
    B, N, L = shape.batch, shape.candidates, shape.history
    if lengths is None:
        # Row 0 full (B = 1 serves a whole history), then about half, nearly full, empty, one...
        lengths = edge_lengths(B + 2, L)[2:]
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if isinstance(model, AttentionPooling):
        query = torch.randn((B, N, model.embed_dim), generator=g)
        keys = torch.randn((B, L, model.kdim), generator=g)
        return Inputs((query, keys), {"lengths": lengths}, ("query", "keys", "lengths"))
    history = torch.randint(1, model.num_items, (B, L), generator=g)
    history[torch.arange(L)[None, :] >= lengths[:, None]] = 0  # padding id past each length
    target = torch.randint(1, model.num_items, (B, N), generator=g)
    if not model.uses_times:
        return Inputs((history, target, lengths), {}, ("history", "target", "lengths"))
    # Request times in 2023; the history's ages from 0 to about 3 years (every time bucket).
    target_time = 1_700_000_000 + torch.randint(0, 10 ** 6, (B,), generator=g)
    age = (10 ** (8.5 * torch.rand((B, L), generator=g, dtype=torch.float64))).long() - 1
    history_times = torch.where(history > 0, target_time[:, None] - age, torch.zeros_like(age))
    return Inputs((history, target, lengths, history_times, target_time), {},
                  ("history", "target", "lengths", "history_times", "target_time"))


def dynamic_dims(model: nn.Module) -> Dict[str, Dict[int, str]]:
    """Input name -> {axis: dim name}: batch, candidates and history length are dynamic."""
    if isinstance(model, AttentionPooling):
        return {"query": {0: "batch", 1: "candidates"}, "keys": {0: "batch", 1: "history"},
                "lengths": {0: "batch"}}
    dims = {"history": {0: "batch", 1: "history"}, "target": {0: "batch", 1: "candidates"},
            "lengths": {0: "batch"}}
    if model.uses_times:
        dims.update(history_times={0: "batch", 1: "history"}, target_time={0: "batch"})
    return dims


OUTPUT_DIMS = {"attention_pooling": {0: "batch", 1: "candidates"},
               "target_attention_ctr": {0: "batch", 1: "candidates"}}


def _export_dims(model: nn.Module) -> Dict[str, Dict[int, torch.export.Dim]]:
    dims: Dict[str, torch.export.Dim] = {}
    out = {}
    for name, axes in dynamic_dims(model).items():
        out[name] = {}
        for axis, dim in axes.items():
            if dim not in dims:
                dims[dim] = torch.export.Dim(dim, min=1)
            out[name][axis] = dims[dim]
    return out


def export_program(model: nn.Module,
                   example: Optional[Inputs] = None) -> torch.export.ExportedProgram:
    """`torch.export` of a serving model with dynamic batch, candidates and history length."""
    example = make_inputs(model, EXAMPLE) if example is None else example
    return torch.export.export(model, example.args, kwargs=example.kwargs,
                               dynamic_shapes=_export_dims(model))


def export_aoti(model: nn.Module, path: str, *, example: Shape = EXAMPLE) -> str:
    """AOTInductor package of `model` at `path` (.pt2): the exported graph compiled to a shared
    library that calls attnkern's ops through the dispatcher (Inductor's proxy executor).
    `example`: the traced inputs' shape (see example_shape)."""
    ep = export_program(model, make_inputs(model, example_shape(example)))
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=path)


def export_onnx(model: nn.Module, path: str, *, exporter: str = "dynamo", example: Shape = EXAMPLE) -> str:
    """ONNX file of `model` at `path`, attnkern's ops written as standard ONNX ops.
    `example`: the traced inputs' shape (see example_shape).

    exporter: "dynamo" (torch.export + onnxscript, the default) or "torchscript" (the legacy
    TorchScript exporter, which needs no onnxscript)."""
    if exporter not in EXPORTERS:
        raise ValueError("exporter must be one of %s, got %r" % (", ".join(EXPORTERS), exporter))
    try:
        import onnx  # noqa: F401  (both exporters write through it)
        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError("ONNX export needs the export extra (%s): pip install 'attnkern[export]'"
                           % e) from e
    from ..ops import onnx_translation

    example = make_inputs(model, example_shape(example))
    names = list(example.names)
    with warnings.catch_warnings():
        # Expected and harmless: the TorchScript tracer flags every shape check of the
        # validation code; the dynamo exporter notes that dims sharing a constraint keep one name.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore",
                                message=".*(axis name|dynamic axes will not be renamed).*")
        if exporter == "dynamo":
            prog = torch.onnx.export(
                model, example.args, kwargs=example.kwargs, dynamo=True, verbose=False,
                dynamic_shapes=_export_dims(model), opset_version=onnx_translation.OPSET,
                custom_translation_table=onnx_translation.translation_table(),
                input_names=names, output_names=["output"])
            prog.save(path)
            return path
        onnx_translation.register_torchscript_symbolics()
        axes = dict(dynamic_dims(model), output=OUTPUT_DIMS[_model_name(model)])
        torch.onnx.export(model, example.args, path, kwargs=example.kwargs, dynamo=False,
                          opset_version=onnx_translation.OPSET, input_names=names,
                          output_names=["output"], dynamic_axes=axes)
    return path


def _model_name(model: nn.Module) -> str:
    return "attention_pooling" if isinstance(model, AttentionPooling) else "target_attention_ctr"


def op_library() -> str:
    """Path of attnkern's op library (the compiled extension), which an AOTInductor package
    of a model with the fused ops needs loaded."""
    spec = importlib.util.find_spec("attnkern._C")
    if spec is None or spec.origin is None:
        raise RuntimeError("attnkern's extension (attnkern._C) is not built: build it with "
                           "`python setup.py build_ext --inplace` or `pip install .`")
    return spec.origin


def check_export(fmt: str, path: str, model: nn.Module,
                 shapes: Sequence[Shape] = CHECK_SHAPES, seed: int = 1) -> List[dict]:
    """Runs the export at `path` in a fresh process (only torch and attnkern's op library, or
    only onnxruntime, imported there) on inputs of each shape, and compares with eager.

    Returns one record per shape: shape, max_abs_err, ok (within ATOL + RTOL * |eager|),
    attnkern_imported (whether the fresh process imported attnkern's Python code: it never
    should)."""
    cases = [make_inputs(model, s, seed=seed + i) for i, s in enumerate(shapes)]
    with torch.inference_mode():
        expected = [model(*c.args, **c.kwargs) for c in cases]
    with tempfile.TemporaryDirectory(prefix="attnkern-check-") as tmp:
        inp, outp = os.path.join(tmp, "inputs.pt"), os.path.join(tmp, "outputs.pt")
        torch.save([{"args": list(c.args), "kwargs": c.kwargs, "names": list(c.names)}
                    for c in cases], inp)
        # Run as a file, from an empty folder: neither attnkern/tools/ (script folder) nor the
        # current folder lands on sys.path, so nothing of attnkern can be imported by accident.
        cmd = [sys.executable, "-c", "import runpy; runpy.run_path(%r, run_name='__main__')"
               % SERVE_CHECK, "--format", fmt, "--package", os.path.abspath(path),
               "--inputs", inp, "--outputs", outp]
        if fmt == "aoti":
            cmd += ["--op-library", op_library()]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise RuntimeError("the fresh process failed to run %s (exit %d):\n%s"
                               % (path, res.returncode, res.stderr[-4000:]))
        got = torch.load(outp)
    records = []
    for shape, want, out in zip(shapes, expected, got["outputs"]):
        err = (out - want).abs()
        ok = out.shape == want.shape and bool((err <= ATOL + RTOL * want.abs()).all())
        records.append({"shape": vars(shape), "max_abs_err": float(err.max()), "ok": ok,
                        "attnkern_imported": got["attnkern_imported"]})
    return records


def _parser() -> argparse.ArgumentParser:
    d = ModelConfig()
    p = argparse.ArgumentParser(prog="attnkern export", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--out", required=True, help="output file (.pt2 for aoti, .onnx for onnx)")
    p.add_argument("--check", action="store_true",
                   help="reload in a fresh process and compare with eager at two shapes")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="ONNX exporter (default: dynamo; torchscript is the legacy one)")
    p.add_argument("--checkpoint", default=None,
                   help="target_attention_ctr: weights from an `attnkern train` checkpoint")
    p.add_argument("--embed-dim", type=int_at_least(1), default=d.embed_dim,
                   help="model width, a multiple of --heads (default: %(default)s)")
    p.add_argument("--heads", type=int_at_least(1), default=d.num_heads,
                   help="attention heads, a divisor of --embed-dim (default: %(default)s)")
    p.add_argument("--num-items", type=int_at_least(1), default=d.num_items)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random weights")
    p.add_argument("--time-bias", type=int_at_least(1), nargs="?", const=64, default=0, metavar="NB",
                   help="target_attention_ctr: a random model with a time table of NB (default 64) "
                   "buckets; its inputs add history_times [B, L] and target_time [B]")
    p.add_argument("--recency-bias", type=int_at_least(1), nargs="?", const=50, default=0, metavar="NR",
                   help="target_attention_ctr: a random model with a recency table of NR (default 50) "
                   "entries")
    p.add_argument("--example-shape", type=_shape_arg, default=EXAMPLE, metavar="B,N,L",
                   help="batch, candidates and history length of the traced example (all stay "
                   "dynamic; N and L choose the attention layer's evaluation order: give the "
                   "serving shape, e.g. 1,1024,2048)")
    return p


def _parse_shape(text: str) -> Shape:
    try:
        b, n, l = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError("--example-shape must be three integers B,N,L, got %r" % text) from None
    if min(b, n, l) < 1:
        raise ValueError("--example-shape sizes must be >= 1, got %r" % text)
    return Shape(b, n, l)


def _shape_arg(text: str) -> Shape:
    try:
        return _parse_shape(text)
    except ValueError as e:  # argparse then prints the usage and this message, exit status 2
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_heads_divide(parser, args.heads, args.embed_dim)
    if args.checkpoint is not None and args.model != "target_attention_ctr":
        parser.error("argument --checkpoint: only with --model target_attention_ctr (a training "
                     "checkpoint), got --model %s" % args.model)
    if (args.time_bias or args.recency_bias) and (args.model != "target_attention_ctr"
                                                  or args.checkpoint is not None):
        parser.error("--time-bias / --recency-bias size a random target_attention_ctr (a "
                     "checkpoint brings its own tables)")
    check_writable_file(parser, "--out", args.out)
    cfg = ModelConfig(model=args.model, embed_dim=args.embed_dim, num_heads=args.heads,
                      num_items=args.num_items, checkpoint=args.checkpoint, seed=args.seed,
                      time_buckets=args.time_bias, recency_buckets=args.recency_bias)
    try:
        model = build_model(cfg)
    except CheckpointError as e:
        parser.error("argument --checkpoint: %s" % e)
    t0 = time.perf_counter()
    if args.format == "aoti":
        export_aoti(model, args.out, example=args.example_shape)
    else:
        export_onnx(model, args.out, exporter=args.exporter, example=args.example_shape)
    seconds = time.perf_counter() - t0
    dims = ", ".join("%s %s" % (n, {a: d for a, d in ax.items()})
                     for n, ax in dynamic_dims(model).items())
    print("attnkern export: %s %s -> %s (%.1f MB, %.1f s); dynamic axes: %s"
          % (args.model, args.format, args.out, os.path.getsize(args.out) / 1e6, seconds, dims))
    if args.format == "aoti":
        print("serving needs: the package, torch's libraries and attnkern's op library %s"
              % op_library())
    if not args.check:
        return 0
    records = check_export(args.format, args.out, model)
    fails = 0
    for r in records:
        s = r["shape"]
        status = "ok" if r["ok"] and not r["attnkern_imported"] else "FAIL"
        fails += status != "ok"
        print("check B=%d N=%d L=%d: max |export - eager| = %.2e  %s"
              % (s["batch"], s["candidates"], s["history"], r["max_abs_err"], status))
    if records and records[0]["attnkern_imported"]:
        print("FAIL: the fresh process imported attnkern's Python code")
    return 1 if fails else 0
