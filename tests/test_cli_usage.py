"""The command line's bad values: each one a usage error (exit status 2) whose message names the
argument and what it accepts, never a traceback. A table of bad values per command, run through
each command's main in process (the arguments are checked before any model, data or kernel is
touched, so every row is quick)."""

from __future__ import annotations

import pytest
import torch

from attnkern.tools import cli

# (argv, pieces the message must contain). export needs --format and --out to get past its
# required arguments; the out path is a temporary file (see _fill).
OUT = "{tmp}/model.pt2"
EXPORT = ["export", "--format", "aoti", "--out", OUT]
BAD = [
    (EXPORT + ["--embed-dim", "0"], ["--embed-dim", "integer >= 1", "0"]),
    (EXPORT + ["--embed-dim", "-4"], ["--embed-dim", "integer >= 1", "-4"]),
    (EXPORT + ["--embed-dim", "x"], ["--embed-dim", "integer >= 1", "'x'"]),
    (EXPORT + ["--heads", "0"], ["--heads", "integer >= 1"]),
    (EXPORT + ["--heads", "3", "--embed-dim", "8"], ["--heads", "divide --embed-dim 8", "1, 2, 4, 8", "got 3"]),
    (EXPORT + ["--num-items", "0"], ["--num-items", "integer >= 1"]),
    (EXPORT + ["--num-items", "-5"], ["--num-items", "integer >= 1", "-5"]),
    (EXPORT + ["--checkpoint", "{tmp}/missing.pt"], ["--checkpoint", "no such file", "missing.pt"]),
    (EXPORT + ["--checkpoint", "{tmp}/not_a_checkpoint.pt"], ["--checkpoint", "is not a checkpoint"]),
    (EXPORT + ["--checkpoint", "{tmp}/tensor.pt"], ["--checkpoint", "is not a checkpoint"]),
    (EXPORT + ["--model", "attention_pooling", "--checkpoint", "{tmp}/tensor.pt"],
     ["--checkpoint", "only with --model target_attention_ctr"]),
    (["export", "--format", "aoti", "--out", "/dev/null/model.pt2"], ["--out", "cannot create the folder"]),
    (["export", "--format", "aoti", "--out", "{tmp}"], ["--out", "expected a file path"]),
    (["export", "--format", "aoti", "--out", OUT, "--example-shape", "1,0,3"], ["--example-shape", ">= 1"]),
    (["train", "--heads", "3", "--embed-dim", "8"], ["--heads", "divide --embed-dim 8", "got 3"]),
    (["train", "--dropout", "2"], ["--dropout", "[0, 1)", "'2'"]),
    (["train", "--dropout", "-0.1"], ["--dropout", "[0, 1)"]),
    (["train", "--dropout", "nan"], ["--dropout", "finite"]),
    (["train", "--device", "nosuch"], ["--device", "auto, cpu, cuda or cuda:N", "'nosuch'"]),
    (["train", "--backend", "nosuch"], ["--backend", "invalid choice", "'nosuch'", "reference"]),
    (["train", "--synthetic-samples", "0"], ["--synthetic-samples", "integer >= 100"]),
    (["train", "--synthetic-samples", "-5"], ["--synthetic-samples", "integer >= 100"]),
    (["train", "--mlp", "0"], ["--mlp", "integer >= 1", "0"]),
    (["train", "--mlp", "64", "-1"], ["--mlp", "integer >= 1", "-1"]),
    (["train", "--epochs", "0"], ["--epochs", "integer >= 1"]),
    (["train", "--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    (["train", "--max-length", "0"], ["--max-length", "integer >= 1"]),
    (["train", "--embed-dim", "0"], ["--embed-dim", "integer >= 1"]),
    (["train", "--lr", "0"], ["--lr", "(0, inf)"]),
    (["train", "--lr", "inf"], ["--lr", "finite"]),
    (["train", "--weight-decay", "-1"], ["--weight-decay", "[0, inf)"]),
    (["bench", "--budget", "-1"], ["--budget", "[0, inf)", "'-1'"]),
    (["bench", "--budget", "-0.5"], ["--budget", "[0, inf)"]),
    (["bench", "--budget", "nan"], ["--budget", "finite"]),
    (["check", "--device", "nosuch"], ["--device", "invalid choice", "cpu", "cuda"]),
    (["check", "--dtype", "float8"], ["--dtype", "invalid choice", "float32"]),
]
if not torch.cuda.is_available():
    BAD += [
        (["check", "--device", "cuda"], ["--device", "cuda needs a CUDA GPU", "none is visible", "cpu"]),
        (["train", "--device", "cuda"], ["--device", "cuda needs a CUDA GPU", "none is visible"]),
        (["train", "--device", "cuda:1"], ["--device", "cuda:1 needs a CUDA GPU"]),
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "not_a_checkpoint.pt").write_text("hello")
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    return tmp


def _fill(argv, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("argv,pieces", BAD, ids=[" ".join(a[:1] + a[5 if a[0] == "export" else 1:])
                                                  for a, _ in BAD])
def test_bad_value_is_a_usage_error(argv, pieces, files, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_fill(argv, files))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "usage: attnkern " + argv[0] in err, err
    for piece in pieces:
        assert piece.replace("{tmp}", str(files)) in err, (piece, err)
    assert "Traceback" not in err


def test_boundary_values_are_accepted():
    """The lowest (and highest) accepted values parse: the checks refuse only what is bad."""
    from attnkern.tools import bench, export, train

    a = train._parser().parse_args(["--dropout", "0", "--lr", "1e-6", "--weight-decay", "0", "--mlp", "1", "1",
                                    "--synthetic-samples", "100", "--epochs", "1", "--device", "cuda:0",
                                    "--backend", "triton", "--heads", "8", "--embed-dim", "8"])
    assert (a.dropout, a.mlp, a.synthetic_samples, a.device, a.backend) == (0.0, [1, 1], 100, "cuda:0", "triton")
    assert train._parser().parse_args(["--dropout", "0.999"]).dropout == 0.999
    e = export._parser().parse_args(["--format", "onnx", "--out", "x.onnx", "--embed-dim", "1", "--heads", "1",
                                     "--num-items", "1"])
    assert (e.embed_dim, e.heads, e.num_items) == (1, 1, 1)
    assert bench.build_parser().parse_args(["--budget", "0"]).budget == 0.0  # one repeat: the smoke tests
