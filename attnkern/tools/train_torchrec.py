"""`attnkern train --engine torchrec`: TargetAttentionCTR with its item table in a TorchRec
`EmbeddingCollection`, sharded by `DistributedModelParallel` over the processes (row-wise or
table-wise), the dense part (attnkern's fused pooling and the MLP head) data-parallel.

    attnkern train --engine torchrec --nproc 2 --data synthetic

launches itself under torchrun (gloo on CPU, nccl on GPU); ``torchrun --nproc_per_node 2 -m
attnkern train --engine torchrec ...`` does the same. The history and the target are two
features of one table, as in the single-process model: a `KeyedJaggedTensor` of the valid
history items (no padding is looked up) and the targets; the pooling takes the history's
`JaggedTensor` as it comes out of the collection. The table's rows are updated in the backward
by FBGEMM's Adagrad (its CPU build has no Adam) at TABLE_LR_SCALE times --lr, the dense
parameters by torch's Adam at --lr (the single-process model's optimizer).

Needs torchrec and fbgemm_gpu (scripts/install_torchrec.sh installs the pair that matches
torch). Results are written as by `attnkern train` (``results.json`` per run, with
``train_step_ms``); no checkpoints.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as data_mod
from . import train as train_mod
from ..models import TargetAttentionCTR

__all__ = ["TorchRecCTR", "torchrec_status", "launch", "run", "shard", "SHARDINGS"]

SHARDINGS = ("row_wise", "table_wise")
TABLE = "item_ids"  # not "items": ModuleDict has a method of that name
FEATURES = ("history", "target")
# The table's Adagrad learning rate is this times --lr (the dense part's Adam rate): Adagrad's
# steps shrink with each row's accumulated squared gradients, and at 1x the table learned too
# slowly (MovieLens, 3 epochs: validation AUC 0.622 against the single-process model's 0.677);
# at 30x it matched it (0.676; 10x: 0.662).
TABLE_LR_SCALE = 30.0


def torchrec_status() -> Optional[str]:
    """None when torchrec and a matching fbgemm_gpu import, else why not (with the versions)."""
    from ._fbgemm import status_with

    return status_with("torchrec")


class TorchRecCTR(nn.Module):
    """TargetAttentionCTR whose item table is a TorchRec EmbeddingCollection (features
    "history" and "target" share it). Takes the padded batch of `attnkern train` (history
    [B, L], target [B], lengths [B]), looks up only the valid history items, and pools the
    resulting JaggedTensor with the model's pooling and head (the same modules, the same
    parameters as `base`, whose item table it does not use)."""

    def __init__(self, base: TargetAttentionCTR, device=None):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.num_items = base.num_items
        self.pooling = base.pooling
        dim = base.embedding.embedding_dim
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=base.num_items,
                                    feature_names=list(FEATURES))],
            device=device)
        self.pool = base.pool
        self.head = base.head

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        if target.dim() != 1:
            raise ValueError("target must be [B] item ids, got %s" % list(target.shape))
        valid = torch.arange(history.shape[1], device=history.device) < lengths[:, None]
        kjt = KeyedJaggedTensor(
            keys=list(FEATURES), values=torch.cat([history[valid], target]),
            lengths=torch.cat([lengths, torch.ones_like(lengths)]).to(torch.int32))
        emb = self.embeddings(kjt)
        hist, t = emb["history"], emb["target"].values()  # JaggedTensor [T, E]; [B, E]
        if self.pool is not None:
            pooled = self.pool(t, hist)
        else:
            rows = torch.repeat_interleave(torch.arange(t.shape[0], device=t.device), hist.lengths().long())
            pooled = torch.zeros_like(t).index_add_(0, rows, hist.values())
        pooled = pooled.to(t.dtype)
        return self.head(torch.cat([t, pooled, t * pooled], dim=-1)).squeeze(-1)


def shard(model: TorchRecCTR, sharding: str, lr: float, device: torch.device, world: int):
    """(DistributedModelParallel of `model`, its optimizer): the item table sharded `sharding`
    with FBGEMM's fused kernel, which updates its rows in the backward by Adagrad (FBGEMM's CPU
    build has no Adam) at TABLE_LR_SCALE * `lr`; the rest data-parallel under torch's Adam at
    `lr` (the single-process model's optimizer)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    if sharding not in SHARDINGS:
        raise ValueError("sharding must be one of %s, got %r" % (", ".join(SHARDINGS), sharding))
    apply_optimizer_in_backward(torch.optim.Adagrad, model.embeddings.parameters(),
                                {"lr": lr * TABLE_LR_SCALE})
    sharders = [EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type),
        constraints={TABLE: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])})
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def copy_table_(dmp, weight: torch.Tensor) -> None:
    """Writes the full table `weight` [num_items, E] into this process's shards, so that the
    sharded model starts from the single-process model's initial table."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    done = 0
    with torch.no_grad():
        for name, t in dmp.state_dict().items():
            if not name.endswith("embeddings.embeddings.%s.weight" % TABLE):
                continue
            shards = t.local_shards() if isinstance(t, ShardedTensor) else None
            if shards is None:
                t.copy_(weight)
                done += 1
                continue
            for s in shards:
                (r, c), (h, w) = s.metadata.shard_offsets, s.metadata.shard_sizes
                s.tensor.copy_(weight[r:r + h, c:c + w])
                done += 1
    total = torch.tensor([done])
    dist.all_reduce(total)  # a table-wise table lives on one process: the others hold no shard
    if int(total) == 0:
        raise RuntimeError("no shard of table %r found in the sharded model's state" % TABLE)


def _rank_chunk(ds: data_mod.CTRDataset, rank: int, world: int) -> data_mod.CTRDataset:
    """This process's equal share of `ds` (the last one padded by repeating its last sample):
    every process must run the same number of forwards, since each one is collective."""
    n = len(ds)
    chunk = -(-n // world)
    idx = torch.arange(rank * chunk, (rank + 1) * chunk).clamp_(max=n - 1)
    return data_mod.CTRDataset(*ds.__getitems__(idx))


def _evaluate(model, ds: data_mod.CTRDataset, batch_size: int, device, rank: int, world: int):
    """AUC/logloss of the sharded model on `ds` (on rank 0; None elsewhere): each process
    predicts its share, rank 0 gathers."""
    from sklearn.metrics import log_loss, roc_auc_score

    prob = torch.from_numpy(train_mod.predict(model, _rank_chunk(ds, rank, world), batch_size, device))
    parts = [torch.empty_like(prob) for _ in range(world)]
    dist.all_gather(parts, prob)
    if rank != 0:
        return None
    p = np.clip(torch.cat(parts)[:len(ds)].numpy(), 1e-7, 1 - 1e-7)
    label = ds.label.numpy().astype(np.int64)
    return {"auc": float(roc_auc_score(label, p)), "logloss": float(log_loss(label, p, labels=[0, 1])),
            "samples": int(label.shape[0])}


def run(cfg: train_mod.RunConfig, splits: data_mod.CTRSplits, out_dir: str, *, resume: bool = False,
        ddp: bool = True, rank: int = 0, world: int = 1, device: Optional[torch.device] = None):
    """`attnkern.tools.train.run` for the TorchRec engine (every process calls it; the
    process group is up). Returns the results dict on rank 0, None elsewhere."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if resume or cfg.compile:
        raise ValueError("--engine torchrec supports neither --resume nor --compile")
    device = device or train_mod.resolve_device(cfg.device)
    if cfg.batch_size % world != 0:
        raise ValueError("--batch-size (%d, the global batch) must be divisible by the number of "
                         "processes (%d)" % (cfg.batch_size, world))
    run_dir = os.path.join(out_dir, cfg.name)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)

    torch.manual_seed(cfg.seed)
    base = train_mod.build_model(cfg, splits.num_items)  # the single-process model's init
    model = TorchRecCTR(base.to(device), device=device)
    dmp, optimizer = shard(model, cfg.sharding, cfg.lr, device, world)
    copy_table_(dmp, base.embedding.weight.detach().to(device))

    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(splits.train, batch_size=cfg.batch_size // world, sampler=sampler,
                        collate_fn=data_mod.identity_collate)
    history: List[dict] = []
    best = {"val_auc": -math.inf, "epoch": 0, "test": None}
    step_seconds: List[float] = []
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        dmp.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        steps = 0
        t0 = time.perf_counter()
        for batch in loader:
            s0 = time.perf_counter()
            loss_sum += train_mod.train_step(dmp, optimizer, batch, device).double().cpu()
            step_seconds.append(time.perf_counter() - s0)
            steps += 1
        seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, torch.tensor(float(steps), dtype=torch.float64)])
        dist.all_reduce(totals)
        val = _evaluate(dmp, splits.valid, cfg.eval_batch_size, device, rank, world)
        test = _evaluate(dmp, splits.test, cfg.eval_batch_size, device, rank, world)
        if rank == 0:
            train_loss = float(totals[0] / max(float(totals[1]), 1.0))
            history.append({"epoch": epoch, "train_loss": train_loss, "val_auc": val["auc"],
                            "val_logloss": val["logloss"], "train_seconds": seconds})
            if val["auc"] > best["val_auc"]:
                best = {"val_auc": val["auc"], "epoch": epoch, "test": test}
            train_mod._log(rank, "%s epoch %d/%d  train_loss %.4f  val_auc %.4f  val_logloss %.4f  (%.1f s)"
                           % (cfg.name, epoch, cfg.epochs, train_loss, val["auc"], val["logloss"], seconds))
    if rank != 0:
        return None
    # The first steps build TorchRec's communication buffers: the median is the steady step.
    step_ms = 1e3 * float(np.median(step_seconds)) if step_seconds else None
    results = {
        "config": asdict(cfg), "data": splits.info, "world_size": world, "device": str(device),
        "engine": "torchrec", "sharding": cfg.sharding,
        "parameters": sum(p.numel() for p in base.parameters()),
        "epochs": history, "best_epoch": best["epoch"], "best_val_auc": best["val_auc"],
        "test": best["test"], "train_step_ms": step_ms,
    }
    train_mod._write_json(os.path.join(run_dir, "results.json"), results)
    train_mod._log(rank, "%s test (epoch %d)  auc %.4f  logloss %.4f  step %.1f ms"
                   % (cfg.name, best["epoch"], best["test"]["auc"], best["test"]["logloss"], step_ms))
    return results


def launch(nproc: int, argv: List[str]) -> int:
    """Runs `attnkern train argv` under torchrun with `nproc` processes on this machine."""
    why = torchrec_status()
    if why is not None:
        print("attnkern train: error: --engine torchrec: " + why, file=sys.stderr)
        return 2
    # The workers need no --nproc, and torchrun would take it for an abbreviation of its own.
    args, skip = [], False
    for a in argv:
        if not skip and not a.startswith("--nproc"):
            args.append(a)
        skip = a == "--nproc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "attnkern", "train"] + args
    return subprocess.call(cmd)
