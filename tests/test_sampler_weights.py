"""The cached and CUDA-graph samplers replace the prior's convolutions with matrices: each
rearrangement, run on random input, must give what the convolution or module it replaces gives.
float64 and tolerances: the two sides run different kernels."""
import pytest
import torch
import torch.nn.functional as F

from brainvq.inference.cuda_graph import _out_matrix, _tap_matrix, _vertical_matrix
from brainvq.inference.sampling import conv_matrix, head_matrices, site_biases, tap_matrices
from modules import GatedLayer, PixelCNN, PriorConfig

CLOSE = {"rtol": 1e-10, "atol": 1e-12}
C = 5  # channels
LAYERS = [(3, 1, True), (3, 2, False), (5, 3, False), (5, 1, True)]  # kernel, dilation, first
LAYER_IDS = [f"k{k}-d{d}-{'first' if f else 'later'}" for k, d, f in LAYERS]


def make_layer(kernel: int, dilation: int, first: bool) -> GatedLayer:
    torch.manual_seed(kernel * 10 + dilation)
    layer = GatedLayer(C, kernel, dilation, first).double()
    with torch.no_grad():
        for p in layer.parameters():  # biases of the size of the weights: both must matter
            p.normal_(0, 1)
    return layer


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def test_conv_matrix_right_multiplies_rows_like_the_1x1_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 7, 1).double()
    x = randn(3, 4, 2, 5)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 7)
    torch.testing.assert_close(rows @ conv_matrix(conv) + conv.bias, expected, **CLOSE)
    assert not conv_matrix(conv).requires_grad  # copies for inference: no graph to the weights


@pytest.mark.parametrize("kernel, dilation, first", LAYERS, ids=LAYER_IDS)
def test_tap_matrices_give_the_horizontal_convolution(kernel, dilation, first):
    layer = make_layer(kernel, dilation, first)
    taps = tap_matrices(layer)  # (T, C, 2C)
    t = layer.half + 1
    assert taps.shape == (t, C, 2 * C) and not taps.requires_grad
    x = randn(3, C, 1, 1 + (t - 1) * dilation)  # one output column's receptive field
    by_taps = sum(x[:, :, 0, j * dilation] @ taps[j] for j in range(t))
    expected = layer.h_conv(x)[:, :, 0, 0]
    torch.testing.assert_close(by_taps + layer.h_conv.bias, expected, **CLOSE)


def test_head_matrices_give_the_head():
    torch.manual_seed(0)
    prior = PixelCNN(PriorConfig(n_codes=11, channels=C, dilations=(1,))).double()
    with torch.no_grad():
        for p in prior.head.parameters():
            p.normal_(0, 1)
    w1, b1, w2, b2 = head_matrices(prior)
    assert not any(w.requires_grad for w in (w1, b1, w2, b2))
    h = randn(4, C)
    expected = prior.head(h[:, :, None, None])[:, :, 0, 0]
    torch.testing.assert_close(torch.relu(torch.relu(h) @ w1 + b1) @ w2 + b2, expected, **CLOSE)


@pytest.mark.parametrize("batched", [False, True], ids=["static", "per-grid"])
def test_site_biases_fold_both_convolution_biases_into_the_horizontal_term(batched):
    layer = make_layer(3, 2, False)
    height, width, batch = 3, 4, 2
    bias_v = randn(1, height, width, 2 * C)  # channels last, as the layers make them
    bias_h = randn(batch, 1, 1, 2 * C) if batched else randn(1, height, width, 2 * C)
    site_v, site_h = site_biases(layer, bias_v, bias_h, height, width)
    assert site_v.shape == (1, 2 * C, height, width)
    assert site_h.shape == (height, width, batch if batched else 1, 2 * C)
    torch.testing.assert_close(site_v, bias_v.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert not site_h.requires_grad  # detached biases in, no graph to the layer's weights out
    # what the layer adds at a site: h_conv's and v_to_h's biases and the stack's own bias
    h_in = randn(batch, C, height, width + layer.reach)
    v_above = randn(batch, 2 * C, height, width)
    full = layer.h_conv(h_in)[..., :width] + layer.v_to_h(v_above) + bias_h.permute(0, 3, 1, 2)
    no_bias = (F.conv2d(h_in, layer.h_conv.weight, dilation=layer.dilation)[..., :width]
               + F.conv2d(v_above, layer.v_to_h.weight))
    torch.testing.assert_close(no_bias + site_h.permute(2, 3, 0, 1), full, **CLOSE)


# ------------------------------------------------------------- the CUDA-graph sampler's slots
F_SLOT = 4 * -(-(2 * C + 1) // 4)  # the slot width the sampler uses for C channels


def slots_like_the_sampler(batch: int, n: int) -> torch.Tensor:
    """(B, n, F) slots [h | gated | 1 | 0…], every part random but the 1 and the zeros."""
    slots = torch.zeros(batch, n, F_SLOT, dtype=torch.float64)
    slots[..., : 2 * C] = randn(batch, n, 2 * C)
    slots[..., 2 * C] = 1
    return slots


@pytest.mark.parametrize("kernel, dilation, first", LAYERS, ids=LAYER_IDS)
def test_tap_matrix_reads_the_h_part_of_consecutive_slots_like_the_convolution(
        kernel, dilation, first):
    layer = make_layer(kernel, dilation, first)
    t = layer.half + 1
    slots = slots_like_the_sampler(3, t)  # the T slots one site's taps read
    matrix = _tap_matrix(layer, F_SLOT)
    assert matrix.shape == (t * F_SLOT, 2 * C)
    x = torch.zeros(3, C, 1, 1 + (t - 1) * dilation, dtype=torch.float64)
    x[:, :, 0, ::dilation] = slots[..., :C].transpose(1, 2)  # the h parts, dilation apart
    expected = F.conv2d(x, layer.h_conv.weight, dilation=dilation)[:, :, 0, 0]
    torch.testing.assert_close(slots.view(3, -1) @ matrix, expected, **CLOSE)


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_out_matrix_adds_the_output_convolution_to_the_residual(first):
    layer = make_layer(3, 1, first)
    slots = slots_like_the_sampler(4, 1)[:, 0]  # (B, F)
    h, gated = slots[:, :C], slots[:, C: 2 * C]
    expected = layer.h_out(gated[:, :, None, None])[:, :, 0, 0] + (0 if first else h)
    torch.testing.assert_close(slots @ _out_matrix(layer, F_SLOT), expected, **CLOSE)


@pytest.mark.parametrize("kernel, dilation, first", LAYERS, ids=LAYER_IDS)
def test_vertical_matrix_gives_the_vertical_convolution_on_patches(kernel, dilation, first):
    layer = make_layer(kernel, dilation, first)
    t, k = layer.half + 1, kernel
    x = randn(3, C, 1 + (t - 1) * dilation, 1 + (k - 1) * dilation)  # one site's field
    patches = x[:, :, ::dilation, ::dilation].permute(0, 2, 3, 1)  # (B, T, k, C)
    got = patches.reshape(3, -1) @ _vertical_matrix(layer) + layer.v_conv.bias
    torch.testing.assert_close(got, layer.v_conv(x)[:, :, 0, 0], **CLOSE)
