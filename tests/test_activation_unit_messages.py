"""The zoos' calling habits meet errors that name the fix: their positional orders (DeepCTR-Torch's
``pool(q, keys, keys_length)``, FuxiCTR's ``pool(target, hist, mask)``) put lengths or a mask
where attnkern takes the values; FuxiCTR's 0/1 float mask; activation names as the zoos'
configurations write them ("Dice", "PReLU"); and zoo activation modules that do not match the
layer's activation in ``load_mlp_``."""

import pytest
import torch
from torch import nn

import attnkern
from attnkern.nn import ActivationUnitPooling

B, L, E = 3, 5, 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, E, generator=g), torch.randn(B, L, E, generator=g)
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return q, k, lengths, mask


# (what lands in the value slot, the keyword the message names)
MISPLACED = {
    "lengths_int64": (lambda lengths, mask: lengths, "did you mean lengths=?"),
    "lengths_int32": (lambda lengths, mask: lengths.int(), "did you mean lengths=?"),
    "deepctr_keys_length": (lambda lengths, mask: lengths[:, None], "lengths=t.view(-1)"),
    "bool_mask": (lambda lengths, mask: mask, "did you mean mask=m?"),
    "fuxictr_float_mask": (lambda lengths, mask: mask.float(), "mask=m.bool()"),
    "long_mask": (lambda lengths, mask: mask.long(), "mask=m.bool()"),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_zoo_positional_order_names_the_keyword(case):
    q, k, lengths, mask = _inputs()
    make, words = MISPLACED[case]
    misplaced = make(lengths, mask)
    pool = ActivationUnitPooling(E, (6,), "relu", backend="reference")
    for call in (lambda: pool(q, k, misplaced),
                 lambda: attnkern.activation_unit_pool(q, k, misplaced, [(pool.hidden[0].weight, None),
                                                                          (pool.out.weight, None)]),
                 lambda: attnkern.attention_pool(q[:, None, :], k[:, :, None, :], misplaced)):
        with pytest.raises(TypeError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith("value is a %s %s tensor" % (str(misplaced.dtype)[6:], list(misplaced.shape)))
        assert words in msg and "(query, key, value, lengths)" in msg


def test_values_given_as_values_still_pass():
    q, k, lengths, _ = _inputs()
    pool = ActivationUnitPooling(E, (6,), "relu", backend="reference")
    torch.testing.assert_close(pool(q, k, k, lengths), pool(q, k, None, lengths))


def test_float_mask_error_gives_fuxictr_conversion():
    q, k, _, mask = _inputs()
    pool = ActivationUnitPooling(E, (6,), "relu", backend="reference")
    with pytest.raises(TypeError, match=r"mask must be a bool tensor \(True = attend\), got torch.float32: "
                                        r"a 0/1 mask with 1 = valid \(FuxiCTR's\) is mask=m.bool\(\)") as err:
        pool(q, k, mask=mask.float())
    assert "key_padding_mask" not in str(err.value)  # the layer has no such argument


@pytest.mark.parametrize("name", ["Dice", "DICE", "PReLU", "ReLU", "Sigmoid"])
def test_activation_names_are_case_insensitive(name):
    q, k, lengths, _ = _inputs()
    # eval(): Dice with its running statistics, which the function below is given.
    pool = ActivationUnitPooling(E, (6,), name, backend="reference").eval()
    assert pool.activation == name.lower()
    lower = ActivationUnitPooling(E, (6,), name.lower(), backend="reference").eval()
    lower.load_state_dict(pool.state_dict())
    torch.testing.assert_close(pool(q, k, lengths=lengths), lower(q, k, lengths=lengths))
    weights = [(pool.hidden[0].weight, pool.hidden[0].bias), (pool.out.weight, pool.out.bias)]
    torch.testing.assert_close(
        attnkern.activation_unit_pool(q, k, None, weights, lengths, activation=name,
                                      activation_params=pool._activation_params(), backend="reference"),
        pool(q, k, lengths=lengths))


class _Dice(nn.Module):
    """The zoos' Dice shape: an alpha and a BatchNorm bn."""

    def __init__(self, units):
        super().__init__()
        self.bn = nn.BatchNorm1d(units, affine=False)
        self.alpha = nn.Parameter(torch.zeros(units))


@pytest.mark.parametrize("built,acts,words", [
    ("relu", lambda: [_Dice(6)], r"activations\[0\] is _Dice but this layer was built with activation='relu': "
                                 r"build it with activation='dice'"),
    ("sigmoid", lambda: [nn.PReLU()], r"is PReLU but .* activation='sigmoid': build it with activation='prelu'"),
    ("dice", lambda: [nn.PReLU()], r"is PReLU but .* activation='dice'"),
    ("prelu", lambda: [_Dice(6)], r"is _Dice but .* activation='prelu'"),
    ("dice", lambda: [nn.Tanh()], r"activations\[0\]: Tanh is none of the activations"),
])
def test_load_mlp_refuses_another_activation(built, acts, words):
    pool = ActivationUnitPooling(E, (6,), built)
    linears = [nn.Linear(4 * E, 6), nn.Linear(6, 1)]
    with pytest.raises(ValueError, match=words):
        pool.load_mlp_(linears, acts())


def test_load_mlp_accepts_matching_parameterless_activations():
    pool = ActivationUnitPooling(E, (6,), "relu")
    linears = [nn.Linear(4 * E, 6), nn.Linear(6, 1)]
    pool.load_mlp_(linears, [nn.ReLU()])
    torch.testing.assert_close(pool.hidden[0].weight, linears[0].weight)
