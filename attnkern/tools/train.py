"""`attnkern train`: trains TargetAttentionCTR with attention pooling and the sum-pooling
baseline, and the HSTU-style sequential ranker (``--model hstu``), on MovieLens (with the
`attnkern[data]` extra) or the built-in synthetic data.

    attnkern train --data movielens --pooling attention sum --seed 0 1 2 3 4 --epochs 4
    attnkern train --data movielens --pooling attention --time-bias --seed 0 1 2 3 4 --epochs 4
    attnkern train --data movielens --model target hstu --seed 0 1 2
    torchrun --nproc_per_node 2 -m attnkern train --ddp --data synthetic

``--time-bias [NB]`` and ``--recency-bias [NR]`` give the attention layer its time and
recency tables (`AttentionPooling`'s time_buckets / recency_buckets); the runs' names and the
summary's rows get a ``-time`` / ``-recency`` suffix.

Each (pooling, seed) run writes ``<out>/<data>-<pooling>-seed<seed>/``: ``checkpoint.pt``
(after every epoch; ``--resume`` continues from it) and ``results.json`` (config,
per-epoch train loss and validation AUC/logloss, test metrics of the epoch with the best
validation AUC). ``<out>/summary-<data>.json`` gathers test AUC mean and std per pooling.
Under ``--ddp`` (launched by torchrun; gloo on CPU, nccl on GPU) ``--batch-size`` is the
global batch, split evenly over the processes by a DistributedSampler; rank 0 evaluates,
logs and writes files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from . import data as data_mod
from ..models import POOLINGS, HSTURanker, TargetAttentionCTR
from ..ops.availability import BACKENDS
from ._args import check_heads_divide, float_in, int_at_least, non_negative_float, positive_float

__all__ = ["main", "RunConfig", "build_model", "train_step", "evaluate", "run", "init_distributed"]


@dataclass
class RunConfig:
    """One training run: one data set, one pooling, one seed."""

    data: str = "synthetic"
    pooling: str = "attention"
    seed: int = 0
    backend: str = "auto"
    epochs: int = 5
    batch_size: int = 256  # global (split over DDP processes)
    lr: float = 1e-3  # the command line's default is 1e-2 on the synthetic data
    weight_decay: float = 0.0
    embed_dim: int = 32
    num_heads: int = 2
    mlp_dims: List[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    max_length: int = 50
    eval_batch_size: int = 4096
    synthetic_samples: int = 30000
    device: str = "auto"
    compile: bool = False
    progress: bool = True
    engine: str = "eager"  # "torchrec": attnkern.tools.train_torchrec
    model: str = "target"  # "hstu": HSTURanker (its runs carry pooling="hstu")
    num_layers: int = 2  # HSTURanker's
    sharding: str = "row_wise"  # the item table's, under --engine torchrec
    time_buckets: int = 0  # the attention layer's time table (0: none)
    recency_buckets: int = 0  # its recency table (0: none)
    synthetic_time_window: Optional[float] = None  # the synthetic data's planted time signal

    @property
    def variant(self) -> str:
        """The pooling and its bias tables, e.g. "attention-time": a row of the summary."""
        return self.pooling + ("-time" if self.time_buckets else "") + (
            "-recency" if self.recency_buckets else "")

    @property
    def name(self) -> str:
        engine = "" if self.engine == "eager" else "-" + self.engine
        return "%s-%s-seed%d%s" % (self.data, self.variant, self.seed, engine)


# --------------------------------------------------------------------------- building blocks


def build_model(cfg: RunConfig, num_items: int, timed: bool = False) -> nn.Module:
    """The run's model; `timed`: the data carries timestamps (HSTURanker's time bias)."""
    if cfg.model == "hstu":
        return HSTURanker(num_items, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                          num_layers=cfg.num_layers, mlp_dims=tuple(cfg.mlp_dims),
                          dropout=cfg.dropout, max_positions=cfg.max_length + 1,
                          num_time_buckets=HSTU_TIME_BUCKETS if timed else 0, backend=cfg.backend)
    return TargetAttentionCTR(
        num_items,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        mlp_dims=tuple(cfg.mlp_dims),
        pooling=cfg.pooling,
        dropout=cfg.dropout,
        backend=cfg.backend,
        time_buckets=cfg.time_buckets or None,
        recency_buckets=cfg.recency_buckets or None,
    )


# Log-bucketed time gaps: ln(gap in seconds) / 0.301 < 64 for any gap below 2.6e8 years.
HSTU_TIME_BUCKETS = 64


class TimedDataset(torch.utils.data.Dataset):
    """A CTRDataset whose batches also carry the history's and the target's timestamps:
    (history, lengths, target, label, history_times, target_time)."""

    def __init__(self, ds: data_mod.CTRDataset):
        self.ds = ds
        self.label = ds.label
        self.history_times = torch.from_numpy(np.ascontiguousarray(ds.meta["history_times"], dtype=np.int64))
        self.target_time = torch.from_numpy(np.ascontiguousarray(ds.meta["timestamp"], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(self.ds.__getitems__(indices)) + (self.history_times[idx], self.target_time[idx])


def _for_model(cfg: RunConfig, splits: data_mod.CTRSplits):
    """(splits, timed): a model with a time table (--time-bias) and HSTURanker (where the data
    has timestamps) get batches with timestamps."""
    timed = bool(cfg.time_buckets) or (cfg.model == "hstu" and "history_times" in splits.train.meta)
    if cfg.time_buckets and "history_times" not in splits.train.meta:
        raise ValueError("a time table (--time-bias) needs timestamps, and the %s data set has "
                         "none" % splits.name)
    if timed:
        splits = dataclasses.replace(splits, train=TimedDataset(splits.train),
                                     valid=TimedDataset(splits.valid), test=TimedDataset(splits.test))
    return splits, timed


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, device) -> torch.Tensor:
    """One optimisation step on `batch` = (history, lengths, target, label[, history_times,
    target_time]); returns the (detached) mean binary cross-entropy of the batch."""
    history, lengths, target, label, *times = (x.to(device, non_blocking=True) for x in batch)
    optimizer.zero_grad(set_to_none=True)
    logits = model(history, target, lengths, *times)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), label)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def predict(model: nn.Module, dataset: data_mod.CTRDataset, batch_size: int, device) -> np.ndarray:
    """Click probabilities of every sample of `dataset`, in order."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        history, lengths, target, _, *times = dataset.__getitems__(
            range(start, min(start + batch_size, len(dataset))))
        logits = model(history.to(device), target.to(device), lengths.to(device),
                       *(t.to(device) for t in times))
        out.append(torch.sigmoid(logits.float()).cpu().double().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(model: nn.Module, dataset: data_mod.CTRDataset, batch_size: int, device) -> Dict[str, float]:
    """ROC AUC and log loss (scikit-learn) of the model's predictions on `dataset`."""
    from sklearn.metrics import log_loss, roc_auc_score

    prob = predict(model, dataset, batch_size, device)
    label = dataset.label.numpy().astype(np.int64)
    prob = np.clip(prob, 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(label, prob)),
        "logloss": float(log_loss(label, prob, labels=[0, 1])),
        "samples": int(label.shape[0]),
    }


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA GPU is visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_type: str):
    """Joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on GPU, gloo on CPU. Returns (rank, world,
    local_rank)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            "--ddp needs the environment that torchrun sets (missing %s); launch with "
            "`torchrun --nproc_per_node N -m attnkern train --ddp ...`" % ", ".join(missing)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


# --------------------------------------------------------------------------- one run


def run(
    cfg: RunConfig,
    splits: data_mod.CTRSplits,
    out_dir: str,
    *,
    resume: bool = False,
    ddp: bool = False,
    rank: int = 0,
    world: int = 1,
    device: Optional[torch.device] = None,
) -> Optional[dict]:
    """Trains one model; returns the results dict on rank 0 (None on other ranks)."""
    from tqdm.auto import tqdm

    device = device or resolve_device(cfg.device)
    run_dir = os.path.join(out_dir, cfg.name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    results_path = os.path.join(run_dir, "results.json")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    if cfg.batch_size % world != 0:
        raise ValueError("--batch-size (%d, the global batch) must be divisible by the number of "
                         "processes (%d)" % (cfg.batch_size, world))

    splits, timed = _for_model(cfg, splits)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, splits.num_items, timed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "history": [], "best_val_auc": -math.inf, "best_epoch": 0,
             "best_model": None, "test": None}
    if resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        state.update({k: ckpt[k] for k in state if k in ckpt})
        _log(rank, "%s: resumed from %s after epoch %d" % (cfg.name, ckpt_path, state["epoch"]))

    core = model
    train_model = model
    if ddp:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(splits.train, batch_size=cfg.batch_size // world, sampler=sampler,
                        collate_fn=data_mod.identity_collate, pin_memory=device.type == "cuda")

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        state["test"] = None  # a resumed run that trains further is tested again
        sampler.set_epoch(epoch)
        train_model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        bar = tqdm(loader, desc="%s epoch %d/%d" % (cfg.name, epoch, cfg.epochs),
                   disable=rank != 0 or not cfg.progress, leave=False, file=sys.stderr)
        for batch in bar:
            loss = train_step(train_model, optimizer, batch, device)
            loss_sum += loss
            steps += 1
            if steps % 20 == 0:
                bar.set_postfix(loss="%.4f" % (loss_sum.item() / steps))
        bar.close()
        totals = torch.stack([loss_sum, torch.tensor(float(steps), dtype=torch.float64, device=device)])
        if ddp:
            dist.all_reduce(totals)
        train_loss = float(totals[0] / max(totals[1], 1))
        seconds = time.perf_counter() - t0

        if rank == 0:
            val = evaluate(core, splits.valid, cfg.eval_batch_size, device)
            record = {"epoch": epoch, "train_loss": train_loss, "val_auc": val["auc"],
                      "val_logloss": val["logloss"], "train_seconds": seconds}
            state["history"].append(record)
            if val["auc"] > state["best_val_auc"]:
                state["best_val_auc"] = val["auc"]
                state["best_epoch"] = epoch
                state["best_model"] = {k: v.detach().clone() for k, v in core.state_dict().items()}
            state["epoch"] = epoch
            _log(rank, "%s epoch %d/%d  train_loss %.4f  val_auc %.4f  val_logloss %.4f  (%.1f s)"
                 % (cfg.name, epoch, cfg.epochs, train_loss, val["auc"], val["logloss"], seconds))
            torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "config": asdict(cfg), **state}, ckpt_path)
        state["epoch"] = epoch
        if ddp:
            dist.barrier()

    if rank != 0:
        return None
    if state["test"] is None and state["best_model"] is not None:
        best = copy.deepcopy(core)
        best.load_state_dict(state["best_model"])
        state["test"] = evaluate(best, splits.test, cfg.eval_batch_size, device)
        torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "config": asdict(cfg), **state}, ckpt_path)
    results = {
        "config": asdict(cfg),
        "data": splits.info,
        "world_size": world,
        "device": str(device),
        "parameters": sum(p.numel() for p in core.parameters()),
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "best_val_auc": state["best_val_auc"],
        "test": state["test"],
    }
    _write_json(results_path, results)
    if state["test"] is not None:
        _log(rank, "%s test (epoch %d)  auc %.4f  logloss %.4f"
             % (cfg.name, state["best_epoch"], state["test"]["auc"], state["test"]["logloss"]))
    return results


# --------------------------------------------------------------------------- command line

BACKEND_CHOICES = ("auto",) + BACKENDS
MODELS = ("target", "hstu")
# Fewest synthetic samples: a tenth each for validation and test still gives AUC both classes.
MIN_SYNTHETIC_SAMPLES = 100


def _device_arg(text: str) -> str:
    name, _, index = text.partition(":")
    if text in ("auto", "cpu") or (name == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError("expected auto, cpu, cuda or cuda:N, got %r" % text)


def _parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="attnkern train",
        description="Train TargetAttentionCTR (attention pooling) and the sum-pooling baseline, "
        "or the HSTU-style ranker (--model hstu); "
        "per-epoch validation AUC/logloss, test metrics at the best validation epoch.",
    )
    p.add_argument("--data", choices=("auto", "movielens", "synthetic"), default="auto",
                   help="auto: movielens when the attnkern[data] extra is installed, else synthetic")
    p.add_argument("--model", nargs="+", choices=MODELS, default=["target"],
                   help="target: TargetAttentionCTR, one run per --pooling (default); hstu: "
                   "HSTURanker, history and target in one sequence through --layers HSTU layers "
                   "with the relative time (MovieLens) and position bias; its runs are named "
                   "and summarised as pooling 'hstu'")
    p.add_argument("--pooling", nargs="+", choices=POOLINGS, default=["attention", "sum"],
                   help="one run per pooling (default: attention sum; din = DIN's activation unit)")
    p.add_argument("--layers", type=int_at_least(1), default=d.num_layers,
                   help="--model hstu: HSTU layers (default: %(default)s)")
    p.add_argument("--seed", nargs="+", type=int, default=[0], help="one run per seed (default: 0)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=d.backend,
                   help="attention backend (default: auto)")
    p.add_argument("--epochs", type=int_at_least(1), default=d.epochs)
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size,
                   help="global batch size, split over the DDP processes")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: 1e-3 on MovieLens, 1e-2 on synthetic data)")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    p.add_argument("--embed-dim", type=int_at_least(1), default=d.embed_dim,
                   help="model width, a multiple of --heads (default: %(default)s)")
    p.add_argument("--heads", type=int_at_least(1), default=d.num_heads,
                   help="attention heads, a divisor of --embed-dim (default: %(default)s)")
    p.add_argument("--mlp", type=int_at_least(1), nargs="+", default=d.mlp_dims, help="hidden sizes of the MLP head")
    p.add_argument("--dropout", type=float_in(0.0, 1.0, high_open=True), default=d.dropout)
    p.add_argument("--max-length", type=int_at_least(1), default=d.max_length, help="history cap L")
    p.add_argument("--synthetic-samples", type=int_at_least(MIN_SYNTHETIC_SAMPLES), default=d.synthetic_samples,
                   help="samples of the synthetic data set, split 80/10/10 into training, validation "
                   "and test (default: %(default)s)")
    p.add_argument("--device", type=_device_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun")
    p.add_argument("--engine", choices=("eager", "torchrec"), default="eager",
                   help="torchrec: the item table sharded by TorchRec's DistributedModelParallel over "
                   "--nproc processes (needs scripts/install_torchrec.sh); see docs/torchrec.md")
    p.add_argument("--nproc", type=int, default=2, help="--engine torchrec: processes torchrun starts")
    p.add_argument("--sharding", choices=("row_wise", "table_wise"), default="row_wise",
                   help="--engine torchrec: how the item table is sharded")
    p.add_argument("--time-bias", type=int_at_least(1), nargs="?", const=64, default=0, metavar="NB",
                   help="attention with a per-head table of NB (default 64) log buckets of how long "
                   "before the target each history item happened (the data's timestamps)")
    p.add_argument("--recency-bias", type=int_at_least(1), nargs="?", const=-1, default=0, metavar="NR",
                   help="attention with a per-head table of NR (default --max-length) entries for an "
                   "item's place from the end of the history")
    p.add_argument("--synthetic-time-window", type=positive_float, default=None, metavar="SECONDS",
                   help="synthetic data: only the history items at most SECONDS before the target "
                   "(and the last one) drive the click probability (a time signal; default: none)")
    p.add_argument("--out", default="runs", help="output folder (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _summary(results: List[dict]) -> Dict[str, dict]:
    """Per pooling (with its bias tables: "attention-time", ...): test AUC over the seeds, and
    the training seconds per epoch (mean over every epoch of every seed: the cost side of the
    comparison)."""
    by_pool: Dict[str, List[float]] = {}
    seconds: Dict[str, List[float]] = {}
    for r in results:
        if r and r["test"]:
            pool = RunConfig(**r["config"]).variant
            by_pool.setdefault(pool, []).append(r["test"]["auc"])
            seconds.setdefault(pool, []).extend(e["train_seconds"] for e in r["epochs"])
    out = {}
    for pool, aucs in by_pool.items():
        secs = seconds[pool]
        out[pool] = {"test_auc_mean": statistics.fmean(aucs),
                     "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                     "seeds": len(aucs), "test_auc": aucs,
                     "train_seconds_per_epoch": statistics.fmean(secs) if secs else None,
                     "train_seconds_per_epoch_std": statistics.stdev(secs) if len(secs) > 1 else 0.0}
    return out


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_heads_divide(parser, args.heads, args.embed_dim)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("argument --device: %s needs a CUDA GPU and none is visible (accepted here: "
                     "auto, cpu)" % args.device)
    data_name = args.data
    if data_name == "auto":
        data_name = "movielens" if data_mod.movielens_available() else "synthetic"
    elif data_name == "movielens" and not data_mod.movielens_available():
        print("attnkern train: error: " + data_mod._EXTRA_HINT, file=sys.stderr)
        return 2
    if args.lr is None:
        args.lr = 1e-2 if data_name == "synthetic" else RunConfig.lr
    if args.recency_bias == -1:
        args.recency_bias = args.max_length
    if args.time_bias or args.recency_bias:
        others = [p for p in args.pooling if p != "attention"]
        if others:
            parser.error("--time-bias and --recency-bias bias the attention logits: they need "
                         "--pooling attention, got %s" % " ".join(others))
        if args.engine != "eager":
            parser.error("--time-bias and --recency-bias are not supported with --engine %s"
                         % args.engine)
        if "hstu" in args.model:
            parser.error("--time-bias and --recency-bias are the target-attention model's tables "
                         "(--model target); --model hstu learns its own time bias")
    if args.synthetic_time_window is not None and data_name != "synthetic":
        parser.error("--synthetic-time-window is for --data synthetic, got %s" % data_name)
    if "hstu" in args.model and args.engine != "eager":
        parser.error("argument --model: hstu trains with --engine eager only")
    run_fn = run
    if args.engine == "torchrec":
        from . import train_torchrec

        if "RANK" not in os.environ:  # not yet under torchrun: start it, running this command
            return train_torchrec.launch(args.nproc, argv if argv is not None else sys.argv[1:])
        run_fn = train_torchrec.run
    rank, world, local_rank = 0, 1, 0
    if args.ddp or args.engine == "torchrec":
        dev_type = resolve_device(args.device).type
        rank, world, local_rank = init_distributed(dev_type)
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    try:
        runs = [("target", p) for p in args.pooling if "target" in args.model]
        runs += [("hstu", "hstu")] if "hstu" in args.model else []
        _log(rank, "attnkern train: data=%s pooling=%s seeds=%s device=%s processes=%d backend=%s"
             % (data_name, ",".join(p for _, p in runs), ",".join(map(str, args.seed)), device,
                world, args.backend))
        results = []
        splits = None
        for seed in args.seed:
            if splits is None or data_name == "synthetic":
                splits = data_mod.load(data_name, max_length=args.max_length, seed=seed,
                                       **({"num_samples": args.synthetic_samples,
                                           "time_window": args.synthetic_time_window}
                                          if data_name == "synthetic" else {}))
            for model, pooling in runs:
                cfg = RunConfig(
                    data=data_name, pooling=pooling, model=model, num_layers=args.layers,
                    seed=seed, backend=args.backend,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, embed_dim=args.embed_dim, num_heads=args.heads,
                    mlp_dims=list(args.mlp), dropout=args.dropout, max_length=args.max_length,
                    synthetic_samples=args.synthetic_samples, device=args.device,
                    compile=args.compile, progress=not args.no_progress,
                    engine=args.engine, sharding=args.sharding, time_buckets=args.time_bias,
                    recency_buckets=args.recency_bias,
                    synthetic_time_window=args.synthetic_time_window,
                )
                results.append(run_fn(cfg, splits, args.out, resume=args.resume, ddp=args.ddp,
                                   rank=rank, world=world, device=device))
        if rank == 0:
            summary = _summary(results)
            _write_json(os.path.join(args.out, "summary-%s.json" % data_name),
                        {"data": data_name, "pooling": summary,
                         "runs": [os.path.join(args.out, RunConfig(**r["config"]).name, "results.json")
                                  for r in results if r]})
            print("\n%-24s %-18s %-7s %s" % ("pooling", "test AUC", "seeds", "s/epoch (train)"))
            for pool, s in summary.items():
                secs = s["train_seconds_per_epoch"]
                print("%-24s %.4f +- %.4f    %-7d %s" % (
                    pool, s["test_auc_mean"], s["test_auc_std"], s["seeds"],
                    "?" if secs is None else "%.1f +- %.1f" % (secs, s["train_seconds_per_epoch_std"])))
    finally:
        if (args.ddp or args.engine == "torchrec") and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
