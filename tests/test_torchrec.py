"""TorchRec and FBGEMM: JaggedTensor histories in the public functions and layers, the
TargetAttentionCTR whose item table TorchRec shards over 2 CPU processes (gloo), and the
fbgemm bench providers against the float64 oracle. The tests that need torchrec or fbgemm_gpu
skip, with the reason, where they are absent (scripts/install_torchrec.sh installs them)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import attnkern
from attnkern import _jagged
from attnkern.nn import ActivationUnitPooling, AttentionPooling
from attnkern.testing import free_port
from attnkern.tools import _fbgemm

_TORCHREC_MISSING = None
try:
    from attnkern.tools.train_torchrec import torchrec_status

    _TORCHREC_MISSING = torchrec_status()
except Exception as e:  # noqa: BLE001
    _TORCHREC_MISSING = "%s: %s" % (type(e).__name__, e)
needs_torchrec = pytest.mark.skipif(_TORCHREC_MISSING is not None, reason=str(_TORCHREC_MISSING))


class FakeJagged:
    """The JaggedTensor interface the unpacking relies on, for tests that run without torchrec."""

    def __init__(self, values, lengths, offsets=None):
        self._values, self._lengths, self._offsets = values, lengths, offsets

    def values(self):
        return self._values

    def lengths(self):
        return self._lengths

    def offsets(self):
        raise AssertionError("attnkern must not call offsets(): it needs FBGEMM when only lengths are set")

    def offsets_or_none(self):
        return self._offsets


def _history(B=5, D=8, dtype=torch.float64, index_dtype=torch.int32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 0, 5, 1, 4][:B], dtype=index_dtype)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0).to(index_dtype)])
    T = int(lengths.sum())
    q = torch.randn(B, 2, D, generator=g, dtype=dtype)
    k = torch.randn(T, 2, D, generator=g, dtype=dtype)
    v = torch.randn(T, 2, D, generator=g, dtype=dtype)
    return q, k, v, lengths, offsets


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_offsets", [True, False])
def test_attention_pool_takes_a_jagged_tensor(index_dtype, with_offsets):
    q, k, v, lengths, offsets = _history(index_dtype=index_dtype)
    jk = FakeJagged(k, lengths, offsets if with_offsets else None)
    want = attnkern.attention_pool(q, k, v, offsets=offsets, backend="reference")
    for key, value in ((jk, v), (jk, FakeJagged(v, lengths, offsets)), (k, FakeJagged(v, lengths))):
        got = attnkern.attention_pool(q, key, value, backend="reference")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unpacking_copies_nothing():
    q, k, v, lengths, offsets = _history()
    key, value, offs = _jagged.unpack_history(FakeJagged(k, lengths), v, None)
    assert key is k and value is v
    assert offs.dtype == lengths.dtype and offs.tolist() == offsets.tolist()
    plain = _jagged.unpack_history(k, v, offsets, lengths=None)
    assert plain[0] is k and plain[1] is v and plain[2] is offsets


@pytest.mark.parametrize("extra", ["offsets", "lengths", "mask", "key_padding_mask"])
def test_jagged_tensor_with_a_layout_argument_is_refused(extra):
    q, k, v, lengths, offsets = _history()
    kw = {"offsets": offsets, "lengths": lengths.long(), "mask": torch.ones(5, 5, dtype=torch.bool),
          "key_padding_mask": torch.zeros(5, 5, dtype=torch.bool)}
    with pytest.raises(ValueError, match="key is a JaggedTensor.*%s" % extra):
        attnkern.attention_pool(q, FakeJagged(k, lengths), v, **{extra: kw[extra]})


def test_mismatched_jagged_key_and_value_are_refused():
    q, k, v, lengths, _ = _history()
    other = torch.tensor([4, 0, 4, 1, 4], dtype=lengths.dtype)
    with pytest.raises(ValueError, match="different offsets"):
        attnkern.attention_pool(q, FakeJagged(k, lengths), FakeJagged(v, other))


def test_a_keyed_jagged_tensor_is_refused_by_name():
    class KeyedJaggedTensor(FakeJagged):
        def keys(self):
            return ["history"]

    q, k, v, lengths, _ = _history()
    with pytest.raises(TypeError, match="got a KeyedJaggedTensor: pass one feature"):
        attnkern.attention_pool(q, KeyedJaggedTensor(k, lengths), v)


def test_layers_take_a_jagged_tensor():
    q, k, _, lengths, offsets = _history(dtype=torch.float32)
    E = 16
    keys, query = k.flatten(1), q.flatten(1)  # [T, E], [B, E]
    torch.manual_seed(0)
    attn = AttentionPooling(E, 2)
    din = ActivationUnitPooling(E, (8,))
    jk = FakeJagged(keys, lengths)
    torch.testing.assert_close(attn(query, jk), attn(query, keys, offsets=offsets), rtol=0, atol=0)
    torch.testing.assert_close(attn(query, jk, jk), attn(query, keys, keys, offsets=offsets), rtol=0, atol=0)
    torch.testing.assert_close(din(query, jk), din(query, keys, offsets=offsets), rtol=0, atol=0)
    with pytest.raises(ValueError, match="keys is a JaggedTensor.*offsets"):
        attn(query, jk, offsets=offsets)


def test_fbgemm_pairing_names_the_versions(monkeypatch):
    assert _fbgemm.matching_fbgemm((2, 14)) == "1.9"
    assert _fbgemm.matching_fbgemm((2, 11)) == "1.6"
    assert _fbgemm.matching_fbgemm((1, 13)) is None
    monkeypatch.setattr(_fbgemm, "installed_fbgemm", lambda: ("fbgemm-gpu-cpu", "1.6.0"))
    monkeypatch.setattr(_fbgemm, "torch_release", lambda: (2, 14))
    monkeypatch.setattr(_fbgemm.importlib.util, "find_spec", lambda name: object())
    _fbgemm.fbgemm_status.cache_clear()
    try:
        why = _fbgemm.fbgemm_status()
    finally:
        _fbgemm.fbgemm_status.cache_clear()
    assert "fbgemm-gpu-cpu 1.6.0 is built for torch 2.11" in why and "fbgemm-gpu-cpu 1.9.x" in why


# --------------------------------------------------------------------------- with torchrec


@needs_torchrec
def test_real_jagged_tensor_and_embedding_collection():
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

    torch.manual_seed(0)
    E = 16
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="item_ids", embedding_dim=E, num_embeddings=50,
                                                     feature_names=["history", "target"])])
    lengths = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    hist = torch.randint(1, 50, (int(lengths.sum()),))
    target = torch.randint(1, 50, (4,))
    kjt = KeyedJaggedTensor(keys=["history", "target"], values=torch.cat([hist, target]),
                            lengths=torch.cat([lengths, torch.ones_like(lengths)]))
    emb = ec(kjt)
    h, t = emb["history"], emb["target"].values()
    pool = AttentionPooling(E, 2)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0).to(torch.int32)])
    want = pool(t, h.values(), offsets=offsets)
    torch.testing.assert_close(pool(t, h), want, rtol=0, atol=0)
    # the pooled gradient reaches the table through the JaggedTensor's values
    pool(t, h).sum().backward()
    assert ec.embeddings["item_ids"].weight.grad.abs().sum() > 0


def _ctr(num_items=40):
    from attnkern.models import TargetAttentionCTR

    torch.manual_seed(0)
    return TargetAttentionCTR(num_items, embed_dim=8, num_heads=2, mlp_dims=(16,))


def _batch(num_items=40, B=6, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    history = torch.randint(1, num_items, (B, L), generator=g)
    history[torch.arange(L) >= lengths[:, None]] = 0
    target = torch.randint(1, num_items, (B,), generator=g)
    return history, lengths, target


@needs_torchrec
@pytest.mark.parametrize("pooling", ["attention", "sum", "din"])
def test_torchrec_model_matches_the_single_process_model(pooling):
    from attnkern.models import TargetAttentionCTR
    from attnkern.tools.train_torchrec import TABLE, TorchRecCTR

    torch.manual_seed(0)
    base = TargetAttentionCTR(40, embed_dim=8, num_heads=2, mlp_dims=(16,), pooling=pooling)
    model = TorchRecCTR(base)
    with torch.no_grad():
        model.embeddings.embeddings[TABLE].weight.copy_(base.embedding.weight)
    history, lengths, target = _batch()
    torch.testing.assert_close(model(history, target, lengths), base(history, target, lengths))


def _sharded_worker(rank, world, port, sharding, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from attnkern.tools.train_torchrec import TorchRecCTR, copy_table_, shard

    dist.init_process_group("gloo")
    try:
        base = _ctr()
        dmp, opt = shard(TorchRecCTR(base), sharding, 1e-2, torch.device("cpu"), world)
        copy_table_(dmp, base.embedding.weight.detach())
        history, lengths, target = _batch(seed=1 + rank)  # each process its own batch
        with torch.no_grad():
            got = dmp(history, target, lengths)
        torch.save({"got": got, "want": base(history, target, lengths).detach()},
                   os.path.join(out, "rank%d.pt" % rank))
        loss = dmp(history, target, lengths).square().mean()
        loss.backward()
        opt.step()
        after = dmp(history, target, lengths)
        assert torch.isfinite(after).all() and not torch.equal(after.detach(), got)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start TorchRec: about 40 s each on 2 cores
@needs_torchrec
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_sharded_model_matches_the_single_process_model(tmp_path, sharding):
    mp.spawn(_sharded_worker, args=(2, free_port(), sharding, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / ("rank%d.pt" % rank))
        torch.testing.assert_close(r["got"], r["want"])


@pytest.mark.slow  # torchrun, 2 processes, 2 epochs: about a minute on 2 cores
@needs_torchrec
def test_train_engine_torchrec_cli(tmp_path):
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(attnkern.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "attnkern", "train", "--engine", "torchrec", "--nproc", "2",
           "--data", "synthetic", "--synthetic-samples", "1500", "--epochs", "2", "--device", "cpu",
           "--pooling", "attention", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "synthetic-attention-seed0-torchrec" / "results.json").read_text())
    assert res["world_size"] == 2 and res["sharding"] == "row_wise" and len(res["epochs"]) == 2
    assert 0.0 <= res["test"]["auc"] <= 1.0 and res["train_step_ms"] > 0


# --------------------------------------------------------------------------- fbgemm provider


@pytest.mark.skipif(_fbgemm.fbgemm_status() is not None, reason=str(_fbgemm.fbgemm_status()))
@pytest.mark.parametrize("provider", ["fbgemm", "fbgemm_bmm"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_fbgemm_provider_matches_the_oracle(provider, mode):
    from attnkern.tools.bench import Case, SHAPES, setup_case

    setup = setup_case(Case(SHAPES["tiny_jagged"], "uniform", "float32", mode))
    ok, err = setup.check(setup.callable(provider)())
    assert ok, err


def test_fbgemm_provider_absent_says_why(monkeypatch):
    from attnkern.tools.bench import providers

    monkeypatch.setattr(_fbgemm, "fbgemm_status", lambda: "fbgemm_gpu is not installed; torch pairs with X")
    assert providers.provider_status("fbgemm", "cpu") == "fbgemm_gpu is not installed; torch pairs with X"
