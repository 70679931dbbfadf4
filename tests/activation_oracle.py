"""Float64 loop oracle of activation-unit pooling: row by row, query by query, position by
position, over the explicit concatenation [q, k, q - k, q * k] (no split of the first layer),
with math.exp for the softmax. As plain as it gets; differentiable through ordinary autograd."""

import math

import torch


def _act(x, activation, act):
    if activation == "relu":
        return x * (x > 0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    if activation == "prelu":
        return torch.where(x > 0, x, act[0] * x)
    if activation == "dice":
        p = 1.0 / (1.0 + torch.exp(-(act[1] * x + act[2])))
        return p * x + act[0] * (1.0 - p) * x
    raise AssertionError(activation)


def valid_positions(a):
    """Per row b: the list of (key row index) positions that take part."""
    B = a["query"].shape[0]
    if a["offsets"] is not None:
        o = a["offsets"].long().tolist()
        return [list(range(o[b], o[b + 1])) for b in range(B)]
    L = a["key"].shape[1]
    if a["mask"] is not None:
        return [[l for l in range(L) if bool(a["mask"][b, l])] for b in range(B)]
    if a["lengths"] is not None:
        return [list(range(int(a["lengths"][b]))) for b in range(B)]
    return [list(range(L)) for _ in range(B)]


def loop_oracle(a):
    """a: the forward op's arguments (attnkern._activation_inputs.FWD_ARGS). Returns
    (out [B, N, Dv], lse [B, N]) in float64."""
    f = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
         for n, t in a.items()}
    q, k, v = f["query"], f["key"], f["value"]
    jagged = f["offsets"] is not None
    B, N, _ = q.shape
    outs, lses = [], []
    for b, pos in enumerate(valid_positions(a)):
        for n in range(N):
            qi = q[b, n]
            scores, rows = [], []
            for l in pos:
                kl = k[l] if jagged else k[b, l]
                vl = v[l] if jagged else v[b, l]
                x = torch.cat([qi, kl, qi - kl, qi * kl])
                h = _act(f["w1"] @ x + f["b1"], f["activation"], f["act1"])
                if f["w2"] is not None:
                    h = _act(f["w2"] @ h + f["b2"], f["activation"], f["act2"])
                scores.append((f["w_out"] @ h + f["b_out"])[0])
                rows.append(vl)
            o = torch.zeros(v.shape[-1], dtype=torch.float64)
            if not scores:
                lse = torch.tensor(-math.inf if f["softmax"] else 0.0, dtype=torch.float64)
            elif f["softmax"]:
                m = max(float(s.detach()) for s in scores)
                e = [torch.exp(s - m) for s in scores]
                z = sum(e)
                for ei, vl in zip(e, rows):
                    o = o + ei / z * vl
                lse = m + torch.log(z)
            else:
                for s, vl in zip(scores, rows):
                    o = o + s * vl
                lse = torch.tensor(0.0, dtype=torch.float64)
            outs.append(o)
            lses.append(lse)
    Dv = v.shape[-1]
    out = torch.stack(outs).reshape(B, N, Dv) if outs else torch.zeros(B, N, Dv, dtype=torch.float64)
    lse = torch.stack(lses).reshape(B, N) if lses else torch.zeros(B, N, dtype=torch.float64)
    return out, lse
