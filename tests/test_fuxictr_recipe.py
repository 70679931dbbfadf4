"""The recipe for FuxiCTR users in docs/recipes.md: a MultiHeadTargetAttention state dict
(W_q, W_k, W_v, W_o, use_scale) loaded into AttentionPooling gives the same output, with
FuxiCTR's 0/1 float mask (1 = valid) and its left-padded ("pre") histories.

The FuxiCTR-style module below is written out here after FuxiCTR's
fuxictr/pytorch/layers/attentions/target_attention.py and dot_product_attention.py
(MultiHeadTargetAttention over ScaledDotProductAttention, dropout 0): same parameter names,
same math, same -1e9 mask fill."""

import pytest
import torch
from torch import nn

from attnkern.nn import AttentionPooling


class FuxiMultiHeadTargetAttention(nn.Module):
    def __init__(self, input_dim=64, attention_dim=64, num_heads=1, use_scale=True, use_qkvo=True):
        super().__init__()
        if not use_qkvo:
            attention_dim = input_dim
        assert attention_dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.scale = self.head_dim ** 0.5 if use_scale else None
        self.use_qkvo = use_qkvo
        if use_qkvo:
            self.W_q = nn.Linear(input_dim, attention_dim, bias=False)
            self.W_k = nn.Linear(input_dim, attention_dim, bias=False)
            self.W_v = nn.Linear(input_dim, attention_dim, bias=False)
            self.W_o = nn.Linear(attention_dim, input_dim, bias=False)

    def forward(self, target_item, history_sequence, mask=None):
        if self.use_qkvo:
            query = self.W_q(target_item)
            key = self.W_k(history_sequence)
            value = self.W_v(history_sequence)
        else:
            query, key, value = target_item, history_sequence, history_sequence
        batch_size = query.size(0)
        query = query.view(batch_size, 1, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if mask is not None:
            mask = mask.view(batch_size, 1, 1, -1).expand(-1, self.num_heads, -1, -1)
        scores = torch.matmul(query, key.transpose(-1, -2))
        if self.scale:
            scores = scores / self.scale
        if mask is not None:
            mask = mask.reshape(scores.shape)
            scores = scores.masked_fill_(mask.float() == 0, -1.0e9)
        attention = scores.softmax(dim=-1)
        output = torch.matmul(attention, value)
        output = output.transpose(1, 2).contiguous().view(-1, self.num_heads * self.head_dim)
        if self.use_qkvo:
            output = self.W_o(output)
        return output


def from_fuxictr(fuxi_state_dict, input_dim, attention_dim, num_heads, use_scale=True,
                 use_qkvo=True):
    """The docs/recipes.md recipe, verbatim."""
    pool = AttentionPooling(input_dim, num_heads, attention_dim=attention_dim if use_qkvo else None,
                            scale=None if use_scale else 1.0, projections=use_qkvo, bias=False)
    if use_qkvo:
        pool.load_state_dict({
            "q_proj.weight": fuxi_state_dict["W_q.weight"],
            "k_proj.weight": fuxi_state_dict["W_k.weight"],
            "v_proj.weight": fuxi_state_dict["W_v.weight"],
            "out_proj.weight": fuxi_state_dict["W_o.weight"],
        })
    return pool


@pytest.mark.parametrize("num_heads,attention_dim", [(1, 16), (2, 16), (4, 32), (2, 8)])
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("use_qkvo", [True, False])
@pytest.mark.parametrize("absorb", ["auto", True, False])
def test_fuxictr_state_dict_recipe(num_heads, attention_dim, use_scale, use_qkvo, absorb):
    torch.manual_seed(0)
    E, B, L = 16, 7, 12
    fuxi = FuxiMultiHeadTargetAttention(E, attention_dim, num_heads, use_scale, use_qkvo)
    pool = from_fuxictr(fuxi.state_dict(), E, attention_dim, num_heads, use_scale, use_qkvo)
    pool.absorb = absorb
    target = torch.randn(B, E)
    history = torch.randn(B, L, E)
    # FuxiCTR pads "pre" by default: row b's valid items are its last lengths[b] positions,
    # and its data loader hands the layer a float mask, 1 = valid.
    lengths = torch.tensor([1, L, 3, 7, 11, 5, 2])
    mask = (torch.arange(L)[None, :] >= L - lengths[:, None]).float()
    expect = fuxi(target, history, mask)
    torch.testing.assert_close(pool(target, history, mask=mask.bool()), expect, atol=1e-5, rtol=1e-5)
    # the same through nn.MultiheadAttention's polarity
    torch.testing.assert_close(pool(target, history, key_padding_mask=mask == 0), expect,
                               atol=1e-5, rtol=1e-5)
    # gradients too
    tq = target.clone().requires_grad_(True)
    th = history.clone().requires_grad_(True)
    fuxi(tq, th, mask).square().sum().backward()
    pq = target.clone().requires_grad_(True)
    ph = history.clone().requires_grad_(True)
    pool(pq, ph, mask=mask.bool()).square().sum().backward()
    torch.testing.assert_close(pq.grad, tq.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ph.grad, th.grad, atol=1e-4, rtol=1e-4)
    if use_qkvo:
        for ours, theirs in (("q_proj", "W_q"), ("k_proj", "W_k"), ("v_proj", "W_v"), ("out_proj", "W_o")):
            torch.testing.assert_close(getattr(pool, ours).weight.grad, getattr(fuxi, theirs).weight.grad,
                                       atol=1e-4, rtol=1e-4)


def test_a_float_mask_is_refused_with_the_conversion():
    fuxi_mask = torch.ones(2, 5)
    pool = AttentionPooling(8, 2)
    with pytest.raises(TypeError, match=r"mask=m\.bool\(\)"):
        pool(torch.randn(2, 8), torch.randn(2, 5, 8), mask=fuxi_mask)
