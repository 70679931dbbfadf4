"""Runs an exported attnkern model the way a serving process would, for `attnkern export --check`.

Run as a file in a fresh interpreter (as `attnkern.tools.export.check_export` does): it
imports torch and, for an AOTInductor package, loads attnkern's op library with
``torch.ops.load_library`` (the compiled ops only, none of attnkern's Python code); for ONNX
it imports onnxruntime and numpy only. It writes the outputs, and whether attnkern's Python
package got imported, to --outputs.
"""

import argparse
import sys

import torch


def _run_aoti(package, op_library, cases):
    torch.ops.load_library(op_library)
    runner = torch._inductor.aoti_load_package(package)
    with torch.inference_mode():
        return [runner(*c["args"], **c["kwargs"]) for c in cases]


def _run_onnx(package, cases):
    import onnxruntime as ort

    sess = ort.InferenceSession(package, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in sess.get_inputs()]
    outs = []
    for c in cases:
        named = dict(zip(c["names"], list(c["args"]) + list(c["kwargs"].values())))
        out = sess.run(None, {n: named[n].numpy() for n in wanted})[0]
        outs.append(torch.from_numpy(out))
    return outs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--format", choices=("aoti", "onnx"), required=True)
    p.add_argument("--package", required=True)
    p.add_argument("--op-library", default=None)
    p.add_argument("--inputs", required=True)
    p.add_argument("--outputs", required=True)
    a = p.parse_args()
    cases = torch.load(a.inputs)
    if a.format == "aoti":
        outs = _run_aoti(a.package, a.op_library, cases)
    else:
        outs = _run_onnx(a.package, cases)
    imported = any(m == "attnkern" or m.startswith("attnkern.") for m in sys.modules)
    torch.save({"outputs": outs, "attnkern_imported": imported}, a.outputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
