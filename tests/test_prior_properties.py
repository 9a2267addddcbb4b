"""What the PixelCNN prior's pieces must do, each with a known answer: its loss in bits is
−log₂ softmax of the true index, the slice condition is the linear interpolation of its table
(the last row for unknown positions) and reaches the logits only through the position
projections, the context encoder's features are zero for an all-hidden grid, and the gate and
the row shift compute what they say. float64: the comparisons hold under every CPU kernel set.
(Causality and the receptive field are checked in test_modules.py.)"""
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from brainvq.checkpoints import load_prior
from brainvq.io_utils import save_checkpoint
from modules import (
    ContextEncoder,
    GatedLayer,
    PixelCNN,
    PriorConfig,
    bits,
    conv_channels_last,
    gate,
    pointwise,
    principal_components,
    shift_down,
)

CLOSE = {"rtol": 1e-10, "atol": 1e-12}
NAN = float("nan")


def make_prior(seed: int = 0, **config) -> PixelCNN:
    """A small random prior in float64 whose optional parts are all non-zero."""
    torch.manual_seed(seed)
    settings = {"n_codes": 10, "channels": 6, "dilations": (1, 2), "grid_size": 8, **config}
    model = PixelCNN(PriorConfig(**settings)).double().eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(5)  # sharper logits: every input moves them visibly
        if model.slice_embedding is not None:
            model.slice_embedding.weight.normal_(0, 1)
        for layer in model.layers:
            for conv in (layer.context_to_v, layer.context_to_h):
                if conv is not None:
                    conv.weight.normal_(0, 0.5)
    return model


# ------------------------------------------------------------------------------- the loss
def test_bits_of_known_probabilities():
    logits = torch.log(torch.tensor([1.0, 3.0], dtype=torch.float64)).view(1, 2, 1, 1)
    logits = logits.expand(1, 2, 1, 2)  # p = (1/4, 3/4) at both sites
    indices = torch.tensor([[[0, 1]]])
    expected = torch.tensor([[[2.0, math.log2(4 / 3)]]], dtype=torch.float64)
    torch.testing.assert_close(bits(logits, indices), expected, **CLOSE)
    torch.testing.assert_close(bits(logits, indices, reduction="mean"), expected.mean(), **CLOSE)


def test_bits_is_minus_log2_softmax_of_the_true_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3
    indices = torch.randint(5, (2, 3, 4))
    by_hand = torch.empty(2, 3, 4, dtype=torch.float64)
    for b in range(2):
        for r in range(3):
            for c in range(4):
                site = logits[b, :, r, c]
                by_hand[b, r, c] = -math.log2(site[indices[b, r, c]].exp() / site.exp().sum())
    torch.testing.assert_close(bits(logits, indices), by_hand, **CLOSE)


def test_bits_per_index_is_the_mean_bits_of_the_model_at_those_positions():
    model = make_prior(slice_bins=3)
    indices = torch.randint(10, (2, 5, 5), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0.2, 0.9], dtype=torch.float64)
    expected = bits(model(indices, positions), indices).mean()
    torch.testing.assert_close(model.bits_per_index(indices, positions), expected, **CLOSE)
    assert not torch.isclose(model.bits_per_index(indices), expected)  # positions count


# -------------------------------------------------------------------------- slice condition
def condition_by_hand(table: torch.Tensor, bins: int, position: float) -> torch.Tensor:
    if math.isnan(position):
        return table[bins]  # the "unknown" row
    scaled = min(max(position, 0.0), 1.0) * (bins - 1)
    low = min(math.floor(scaled), bins - 2)
    weight = scaled - low
    return table[low] * (1 - weight) + table[low + 1] * weight


@pytest.mark.parametrize("bins", [2, 5])
def test_slice_condition_interpolates_its_table_linearly_and_nan_is_the_last_row(bins):
    model = make_prior(slice_bins=bins)
    table = model.slice_embedding.weight.detach()
    positions = [0.0, 0.1, 0.25, 0.5, 0.6, 0.99, 1.0, 1.4, -0.3, NAN]
    got = model.slice_condition(torch.tensor(positions, dtype=torch.float64), len(positions))
    assert got.shape == (len(positions), 1, 1, 6)
    expected = torch.stack([condition_by_hand(table, bins, p) for p in positions])
    torch.testing.assert_close(got[:, 0, 0], expected, **CLOSE)
    unknown = model.slice_condition(None, 3)[:, 0, 0]
    torch.testing.assert_close(unknown, table[bins].expand(3, -1), **CLOSE)


def test_an_unconditioned_prior_has_no_condition():
    model = make_prior()
    assert model.slice_condition(torch.tensor([0.5]), 1) is None
    assert model.slice_condition(None, 2) is None


def test_positions_reach_the_logits_only_through_the_position_projections():
    model = make_prior(slice_bins=4)
    grid = torch.randint(10, (2, 6, 6), generator=torch.Generator().manual_seed(2))
    here = torch.tensor([0.1, 0.7], dtype=torch.float64)
    there = torch.tensor([0.9, NAN], dtype=torch.float64)
    assert (model(grid, here) - model(grid, there)).abs().amax() > 1e-3
    with torch.no_grad():
        for layer in model.layers:
            layer.position_to_v.weight.zero_()
            layer.position_to_h.weight.zero_()
    torch.testing.assert_close(model(grid, here), model(grid, there), **CLOSE)


@pytest.mark.parametrize("grid_size", [8, 0], ids=["embedding", "no-embedding"])
def test_projecting_the_condition_once_equals_adding_it_before_the_projection(grid_size):
    """The layers add W·condition to the projected position embedding (W·P + b), which is
    what projecting P + condition at every site gives; without an embedding, W·c + b."""
    model = make_prior(slice_bins=4, grid_size=grid_size)
    condition = model.slice_condition(torch.tensor([0.3, NAN], dtype=torch.float64), 2)
    position = model.position_grid(5, 7)
    base = position if position is not None else torch.zeros(1, 1, 1, 6, dtype=torch.float64)
    for layer in model.layers:
        projections = (layer.position_to_v, layer.position_to_h)
        conditioned = layer.position_bias(position, condition)
        plain = layer.position_bias(position, None)
        for bias, unconditioned, conv in zip(conditioned, plain, projections, strict=True):
            torch.testing.assert_close(bias.expand(2, 5, 7, -1),
                                       as_conv(conv, base + condition).expand(2, 5, 7, -1),
                                       **CLOSE)
            expected = as_conv(conv, base)
            expected = expected if position is not None else torch.zeros_like(expected)
            torch.testing.assert_close(unconditioned.expand(1, 5, 7, -1),
                                       expected.expand(1, 5, 7, -1), **CLOSE)


def test_position_grid_is_the_embedding_cut_to_the_grid():
    model = make_prior(grid_size=8)
    torch.testing.assert_close(model.position_grid(5, 7),
                               model.position[:, :, :5, :7].permute(0, 2, 3, 1), rtol=0, atol=0)
    assert make_prior(grid_size=0).position_grid(5, 7) is None


def test_a_fresh_prior_starts_with_small_position_vectors_and_silent_context():
    torch.manual_seed(0)
    model = PixelCNN(PriorConfig(n_codes=10, channels=64, dilations=(1, 2), grid_size=16,
                                 slice_bins=8, context_channels=4))
    assert 0.09 < model.position.std() < 0.11
    assert 0.08 < model.slice_embedding.weight.std() < 0.12
    assert model.slice_embedding.num_embeddings == 9  # eight bins and "unknown"
    assert 0.08 < model.context_encoder.embedding.weight.std() < 0.12
    for layer in model.layers:
        assert torch.count_nonzero(layer.context_to_v.weight) == 0
        assert torch.count_nonzero(layer.context_to_h.weight) == 0
        assert layer.context_to_v.bias is None


# ------------------------------------------------------------------------------- context
def test_context_features_enter_each_layer_through_its_context_projections():
    model = make_prior(context_channels=4)
    context = torch.randint(-1, 10, (2, 5, 5), generator=torch.Generator().manual_seed(3))
    features = model.context_features(context)
    position = model.position_grid(5, 5)
    for layer in model.layers:
        with_context = layer.position_bias(position, None, features)
        without = layer.position_bias(position, None)
        for a, b, conv in zip(with_context, without, (layer.context_to_v, layer.context_to_h),
                              strict=True):
            torch.testing.assert_close(a - b, as_conv(conv, features), **CLOSE)
    grid = torch.randint(10, (2, 5, 5))
    assert (model(grid, context=context) - model(grid)).abs().amax() > 1e-3


def test_context_encoder_features_vanish_for_an_all_hidden_grid():
    torch.manual_seed(0)
    encoder = ContextEncoder(PriorConfig(n_codes=10, context_channels=4,
                                         context_dilations=(1, 2))).double()
    hidden = torch.full((1, 5, 6), -1)
    torch.testing.assert_close(encoder(hidden), torch.zeros(1, 4, 5, 6, dtype=torch.float64),
                               rtol=0, atol=0)
    context = torch.randint(-1, 10, (2, 5, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(encoder(context), encoder.encode(context) - encoder.encode(hidden),
                               **CLOSE)
    assert encoder.embedding.num_embeddings == 11  # ten codes and "hidden"
    # a hidden site reads the embedding's last row, code 0 the first; residual convolutions
    for grid in (hidden, context):
        x = encoder.embedding.weight[grid.where(grid != -1, 10)].permute(0, 3, 1, 2)
        for conv in encoder.convs:
            x = x + conv(F.relu(x))
        torch.testing.assert_close(encoder.encode(grid), x, **CLOSE)
    assert (context == 0).any() and (context == -1).any()


def test_without_a_context_encoder_there_are_no_context_features():
    model = make_prior()
    assert model.context_features(torch.zeros(1, 4, 4, dtype=torch.long)) is None


def as_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv` itself on channels-last (B, H, W, C) features."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------- the layer's parts
def test_gate_is_tanh_of_the_first_half_times_sigmoid_of_the_second():
    x = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 100.0], dtype=torch.float64)
    expected = torch.tensor([0.0, math.tanh(1) * 0.5, math.tanh(-1) * 1.0], dtype=torch.float64)
    torch.testing.assert_close(gate(x.view(1, 1, 1, 6)).flatten(), expected, **CLOSE)
    torch.testing.assert_close(gate(x.view(1, 6, 1, 1), dim=1).flatten(), expected, **CLOSE)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_is_the_1x1_convolution_forwards_and_backwards(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 1, bias=bias).double()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)  # channels last
    expected = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = pointwise(conv, x)
    torch.testing.assert_close(out, expected, **CLOSE)
    grad = torch.randn_like(out)
    wanted = torch.autograd.grad(expected, [x, *conv.parameters()], grad)
    got = torch.autograd.grad(out, [x, *conv.parameters()], grad)
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


def test_shift_down_moves_each_row_one_down_and_fills_row_zero_with_zeros():
    x = torch.arange(1.0, 13.0).view(1, 3, 4, 1)  # (B, H, W, C)
    expected = torch.tensor([[0.0] * 4, [1.0, 2, 3, 4], [5.0, 6, 7, 8]]).view(1, 3, 4, 1)
    assert torch.equal(shift_down(x), expected)


@pytest.mark.parametrize("kernel, dilation, first, reach, pad", [
    (3, 1, True, 1, 2), (3, 4, False, 4, 4), (5, 3, True, 6, 7), (5, 2, False, 4, 4)])
def test_gated_layer_geometry(kernel, dilation, first, reach, pad):
    layer = GatedLayer(4, kernel, dilation, first)
    half = kernel // 2
    assert (layer.reach, layer.h_pad) == (reach, pad)
    assert layer.v_conv.kernel_size == (half + 1, kernel)  # rows above and the row itself
    assert layer.h_conv.kernel_size == (1, half + 1)  # columns left and the column itself
    assert layer.v_conv.dilation == layer.h_conv.dilation == (dilation, dilation)


def test_the_horizontal_output_adds_the_input_except_in_the_first_layer():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 6, 4, dtype=torch.float64)  # (B, H, W, C)
    h = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    for first in (True, False):
        layer = GatedLayer(4, 3, 2, first).double()
        bias = layer.position_bias(None, None)
        v_out, h_out = layer(v, h, bias)
        assert v_out.shape == h_out.shape == (2, 5, 6, 4)
        # the first layer never reads a site's own input: its last column is read by none
        changed = h.clone()
        changed[:, :, -1] += 1.0
        moved = layer(v, changed, bias)[1] - h_out
        assert (torch.count_nonzero(moved) == 0) == first
        with torch.no_grad():  # with its output convolution silenced, what is left
            layer.h_out.weight.zero_()
            layer.h_out.bias.zero_()
        expected = torch.zeros_like(h) if first else h
        torch.testing.assert_close(layer(v, h, bias)[1], expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the embedding's start
def test_principal_coordinates_grow_along_each_axis_largest_entry():
    """The SVD may return an axis or its negative; the sign is fixed so that the axis's largest
    entry is positive: coordinates then grow with the data along that entry."""
    torch.manual_seed(0)
    x = torch.randn(300, 3, dtype=torch.float64) * torch.tensor([5.0, 1.0, 0.1]) + 2
    x[:, 1] += 0.2 * x[:, 0]  # the widest axis leans a little towards the second
    coords = principal_components(x, 2)
    assert coords.shape == (300, 2)
    for i in range(2):  # axis i: mostly coordinate i, so the coordinate grows with it
        assert torch.corrcoef(torch.stack([coords[:, i], x[:, i]]))[0, 1] > 0.5


def test_principal_components_of_few_or_degenerate_rows():
    torch.manual_seed(0)
    few = principal_components(torch.randn(5, 8, dtype=torch.float64), 8)
    assert few.shape == (5, 5)  # no more axes than rows
    flat = torch.zeros(6, 3, dtype=torch.float64)
    flat[:, 0] = torch.arange(6.0)  # all variance on one axis, none on the others
    coords = principal_components(flat, 3)
    assert torch.isfinite(coords).all()
    torch.testing.assert_close(coords[:, 0].std(), torch.tensor(1.0, dtype=torch.float64))


def test_embed_like_puts_the_scaled_leading_components_in_the_first_channels():
    torch.manual_seed(0)
    for dim, channels in ((12, 6), (12, 16), (4, 6)):  # K = 10 codes of D, C channels
        codebook = torch.randn(10, dim) @ torch.randn(dim, dim)
        model = PixelCNN(PriorConfig(n_codes=10, channels=channels, dilations=(1,)))
        before = model.embedding.weight.detach().clone()
        model.embed_like(codebook)
        components = principal_components(codebook, channels)  # (K, min(C, D, K))
        n = components.shape[1]
        assert n == min(channels, dim, 10)
        torch.testing.assert_close(model.embedding.weight[:, :n], components * before.std())
        assert torch.equal(model.embedding.weight[:, n:], before[:, n:])


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("vertical_residual", [True, False])
def test_gated_layer_equals_its_definition_on_nchw_features(first, vertical_residual):
    """The channels-last layer computes what the gated layer's equations say, written here with
    the layer's own convolutions on (B, C, H, W) tensors. A residual vertical stack adds its
    input to its gated output (never in the first layer) and the horizontal stack reads that
    output; van den Oord et al.'s reads the vertical pre-activations."""
    torch.manual_seed(0)
    layer = GatedLayer(4, 3, 2, first, vertical_residual=vertical_residual).double()
    v, h = torch.randn(2, 2, 4, 5, 6, dtype=torch.float64)  # (B, C, H, W) each
    bias_v, bias_h = torch.randn(2, 2, 8, 5, 6, dtype=torch.float64)  # (B, 2C, H, W) each
    r, width = layer.reach, v.shape[-1]
    v_pre = layer.v_conv(F.pad(v, (r, r, r, 0))) + bias_v
    v_out = v + gate(v_pre, dim=1) if vertical_residual and not first else gate(v_pre, dim=1)
    h_pre = layer.h_conv(F.pad(h, (layer.h_pad, 0, 0, 0))[..., : width + r]) + bias_h
    link = v_out if vertical_residual else v_pre
    above = F.pad(link, (0, 0, 1, 0))[:, :, :-1]  # row r sees the vertical stack's row r − 1
    h_new = layer.h_out(gate(h_pre + layer.v_to_h(above), dim=1))
    expected = (v_out, h_new if first else h + h_new)

    def last(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)

    got = layer(last(v), last(h), (last(bias_v), last(bias_h)))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, last(b), **CLOSE)


def test_conv_channels_last_is_the_convolution_in_another_layout():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, (2, 3), dilation=2).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    got = conv_channels_last(conv, x.permute(0, 2, 3, 1))
    torch.testing.assert_close(got, conv(x).permute(0, 2, 3, 1), rtol=0, atol=0)



def test_a_checkpoint_saved_without_the_vertical_residual_field_loads_without_it(tmp_path):
    """Checkpoints from before `vertical_residual` existed were trained without it: loaded, they
    compute what they computed then, not what the field's default now means."""
    torch.manual_seed(0)
    cfg = PriorConfig(n_codes=10, channels=8, dilations=(1, 2, 1), vertical_residual=False)
    old = PixelCNN(cfg).eval()
    saved = {k: v for k, v in asdict(cfg).items() if k != "vertical_residual"}
    save_checkpoint({"model": old.state_dict(), "model_config": saved}, tmp_path / "prior.pt")
    loaded = load_prior(tmp_path / "prior.pt", torch.device("cpu"))
    indices = torch.randint(10, (2, 6, 6))
    assert PriorConfig().vertical_residual and not loaded.cfg.vertical_residual
    with torch.no_grad():  # the same weights through the same kernels
        assert torch.equal(loaded(indices), old(indices))
    with pytest.raises(RuntimeError, match="v_to_h"):  # the default's layers do not fit them
        PixelCNN(PriorConfig(**saved)).load_state_dict(old.state_dict())
