"""Ancestral sampling from the PixelCNN prior in raster order: the naive reference (a forward
pass per site) and the exact cached sampler (each site computed once from cached layer states)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modules import GatedLayer, PixelCNN, gate


@torch.no_grad()
def sample(prior: PixelCNN, indices: torch.Tensor, temperature: float = 1.0,
           generator: torch.Generator | None = None, method: str = "fast",
           positions: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Fill every −1 in `indices` (B, H, W) by ancestral sampling in raster order.

    Entries that are not −1 are kept as given (full generation: all −1; inpainting: some).
    `method="fast"` caches every layer's states and computes each site once;
    `method="naive"` is the reference: one forward pass per generated site. With the same
    generator state both return the same grids. `positions` (B,): each grid's relative slice
    position, for a prior conditioned on it (None or NaN: unknown). `top_p` < 1: nucleus
    sampling, each site drawn from its likeliest codes that hold that much probability.
    """
    out = check_sample_input(indices, prior.cfg.n_codes)
    if method == "naive":
        return sample_naive(prior, out, temperature, generator, positions, top_p)
    if method == "fast":
        return sample_cached(prior, out, temperature, generator, positions, top_p)[0]
    raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")


def sample_naive(prior: PixelCNN, out: torch.Tensor, temperature: float,
                 generator: torch.Generator | None,
                 positions: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """One forward pass per site to fill: the reference."""
    for r, c in sites_to_fill(out):
        # rows below r cannot matter
        logits = prior(out[:, : r + 1].clamp(min=0), positions)[:, :, r, c]
        _fill_site(out, r, c, logits, temperature, generator, top_p)
    return out


def sample_cached(prior: PixelCNN, out: torch.Tensor, temperature: float,
                  generator: torch.Generator | None, positions: torch.Tensor | None = None,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ancestral sampling. Returns the grid and the logits (B, K, H, W) used at the
    sampled sites (NaN elsewhere), for checking against a full forward pass."""
    b, height, width = out.shape
    logits_used = torch.full((b, prior.cfg.n_codes, height, width), float("nan"),
                             device=out.device)
    columns = columns_to_fill(out)
    if not columns:
        return out, logits_used
    first_row, last_row = min(columns), max(columns)
    # `out` and `logits_used` are made outside: inference tensors could not enter autograd.
    with torch.inference_mode():
        cache = _SamplingCache(prior, out, first_row, positions)
        for r in range(first_row, last_row + 1):
            if r in columns:  # a row with nothing to fill needs only its vertical stack
                cache.start_row(r)
                for c in range(max(columns[r]) + 1):
                    h = cache.advance(c)
                    if c in columns[r]:
                        logits = cache.logits(h)
                        logits_used[:, :, r, c] = logits
                        _fill_site(out, r, c, logits, temperature, generator, top_p)
                        cache.set_site(c, out[:, r, c])
            if r < last_row:
                cache.finish_row(r)
    return out, logits_used


@torch.no_grad()
def sample_particles(prior: PixelCNN, indices: torch.Tensor, particles: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Fill every −1 in `indices` (B, H, W) with `particles` raster fills per grid, by sequential
    Monte Carlo: (B · particles, H, W), grid b's particles at rows b·particles onwards.

    Raster order never sees the given indices after a hole site. Here each particle carries a
    weight, the probability of the given indices it has passed (in the rows that hold holes);
    before a hole site is drawn, a grid whose weights' effective sample size fell below half its
    particles is resampled in proportion to them. Particles then follow the given context to
    the right of and between a hole's rows, not only above it. `positions` (B,): relative slice
    positions, for a conditioned prior.
    """
    out = check_sample_input(indices, prior.cfg.n_codes).repeat_interleave(particles, 0)
    where = None if positions is None else positions.repeat_interleave(particles)
    columns = columns_to_fill(out)
    if not columns:
        return out
    first_row, last_row = min(columns), max(columns)
    log_weights = torch.zeros(len(out), dtype=torch.float64, device=out.device)
    items = torch.arange(len(out), device=out.device)
    with torch.inference_mode():
        cache = _SamplingCache(prior, out, first_row, where)
        for r in range(first_row, last_row + 1):
            if r in columns:
                cache.start_row(r)
                # past the row's last hole only given sites remain: they weigh the particles
                end = out.shape[2] if r < last_row else max(columns[r]) + 1
                for c in range(end):
                    logits = cache.logits(cache.advance(c))
                    given = out[:, r, c] != -1
                    if not given.all():  # a hole: resample first where the weights are spent
                        if _resample(cache, log_weights, particles, generator):
                            logits = cache.logits(cache.output[c])  # each particle's own
                        _fill_site(out, r, c, logits, temperature, generator)
                        cache.set_site(c, out[:, r, c])
                    codes = out[:, r, c]
                    log_p = torch.log_softmax(logits.double() / temperature, dim=1)[items, codes]
                    log_weights += torch.where(given, log_p, 0.0)
            if r < last_row:
                cache.finish_row(r)
    return out


def _resample(cache: _SamplingCache, log_weights: torch.Tensor, particles: int,
              generator: torch.Generator | None) -> bool:
    """Resample, within each grid's particles, the grids whose weights' effective sample size
    is below half their particles; their weights are then equal again. Whether any was."""
    weights = torch.softmax(log_weights.view(-1, particles), dim=1)  # (B, particles)
    spent = 1 / weights.square().sum(1) < particles / 2
    if not spent.any():
        return False
    drawn = torch.multinomial(weights[spent], particles, replacement=True, generator=generator)
    order = torch.arange(len(log_weights), device=log_weights.device).view(-1, particles)
    order[spent] = drawn + order[spent, :1]
    cache.reorder(order.flatten())
    log_weights.view(-1, particles)[spent] = 0.0
    return True


class _SiteStep(NamedTuple):
    """One layer's work at one column: views into the cache's state, and the weights."""

    taps: list[tuple[torch.Tensor, torch.Tensor]]  # per tap: (B, C) input, (C, 2C) weight
    term: torch.Tensor  # (B, 2C): what the vertical stack above and the biases add
    pre: torch.Tensor  # (B, 2C): the site's pre-activations, reused
    pre_a: torch.Tensor  # (B, C): view of `pre`, its tanh half
    pre_b: torch.Tensor  # (B, C): view of `pre`, its sigmoid half
    residual: torch.Tensor | None  # (B, C): the layer's input at the site; None in layer 0
    w_out: torch.Tensor  # (C, C): h_out as a matrix
    b_out: torch.Tensor  # (C,)
    nxt: torch.Tensor  # (B, C): the next layer's input at the site, or the last output


class _SamplingCache:
    """Exact incremental state of a PixelCNN while its grid (B, H, W) is filled in raster order.

    The vertical stack at a row sees only that row and rows above, so each layer keeps its
    zero-padded input (B, C, pad + H, pad + W + pad) and recomputes a row with its own
    convolution once the row is final. The horizontal stack feeds nothing but later sites of
    its own row, so each layer keeps one row of input, (pad + W, B, C), in which a site's (B, C)
    block is contiguous. A site then costs a few small matmuls on weights rearranged once;
    what the vertical stack above and the biases add at each site comes as one (W, B, 2C)
    term per layer and row, and the views a site reads and writes are made once per column.
    """

    def __init__(self, model: PixelCNN, grid: torch.Tensor, first_row: int,
                 positions: torch.Tensor | None = None) -> None:
        """`grid` is filled in place by the caller; rows above `first_row` must be final."""
        self.grid, self.layers = grid, list(model.layers)
        self.embedding = model.embedding.weight  # (K, C)
        b, height, width = grid.shape
        c = model.cfg.channels
        zeros = self.embedding.new_zeros
        self.v_in = [zeros(b, c, layer.reach + height, width + 2 * layer.reach)
                     for layer in self.layers]
        # the last final row's vertical link (`GatedLayer.vertical_link`)
        self.v_above = [zeros(b, layer.v_to_h.in_channels, 1, width) for layer in self.layers]
        self.rows = [zeros(layer.h_pad + width, b, c) for layer in self.layers]
        self.row_terms = [zeros(width, b, 2 * c) for _ in self.layers]
        self.pre = [zeros(b, 2 * c) for _ in self.layers]  # a site's pre-activations, reused
        self.output = zeros(width, b, c)  # the last layer's horizontal stack along the row
        # per layer: (1 or B, 2C, H, W); (H, W, 1 or B, 2C) with both conv biases
        self.v_bias, self.h_bias = [], []
        condition = model.slice_condition(positions, b)  # (B, 1, 1, C) or None
        for layer, biases in zip(self.layers, model.position_biases(height, width, condition),
                                 strict=True):
            bias_v, bias_h = site_biases(layer, *biases, height, width)
            self.v_bias.append(bias_v)
            self.h_bias.append(bias_h)
        self.v_to_h = [conv_matrix(layer.v_to_h) for layer in self.layers]  # (C or 2C, 2C)
        self.w_taps = [tap_matrices(layer) for layer in self.layers]  # (T, C, 2C)
        self.head_weights = head_matrices(model)
        self.steps = [self._site_plan(col) for col in range(width)]
        if first_row > 0:
            self._update_vertical(0, first_row)

    def _site_plan(self, col: int) -> list[_SiteStep]:
        """Per layer, the views and weights that computing column `col` reads and writes."""
        plan = []
        for i, layer in enumerate(self.layers):
            row, d, pre = self.rows[i], layer.dilation, self.pre[i]
            taps = [(row[col + j * d], w) for j, w in enumerate(self.w_taps[i])]
            residual = None if layer.first else row[col + layer.h_pad]
            nxt = self.rows[i + 1][col + self.layers[i + 1].h_pad] \
                if i + 1 < len(self.layers) else self.output[col]
            plan.append(_SiteStep(taps, self.row_terms[i][col], pre, *pre.chunk(2, dim=1),
                                  residual, conv_matrix(layer.h_out), layer.h_out.bias, nxt))
        return plan

    def start_row(self, r: int) -> None:
        """Load row r's given codes into the first layer and each layer's per-site term."""
        first = self.layers[0]
        embedded = F.embedding(self.grid[:, r].clamp(min=0), self.embedding)  # (B, W, C)
        self.rows[0][first.h_pad:] = embedded.transpose(0, 1)
        for i in range(len(self.layers)):
            above = self.v_above[i][:, :, 0].permute(2, 0, 1)  # (W, B, C or 2C)
            torch.add(above @ self.v_to_h[i], self.h_bias[i][r], out=self.row_terms[i])

    def advance(self, col: int) -> torch.Tensor:
        """Every layer's horizontal stack at column `col`; returns the last layer's (B, C)."""
        for step in self.steps[col]:
            (x, w), *rest = step.taps
            torch.addmm(step.term, x, w, out=step.pre)
            for x, w in rest:
                step.pre.addmm_(x, w)
            gated = torch.tanh(step.pre_a).mul_(torch.sigmoid(step.pre_b))
            if step.residual is None:
                torch.addmm(step.b_out, gated, step.w_out, out=step.nxt)
            else:
                torch.add(step.residual, torch.addmm(step.b_out, gated, step.w_out), out=step.nxt)
        return step.nxt

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C) last horizontal stack → (B, K) logits: the model's head as two matmuls."""
        w1, b1, w2, b2 = self.head_weights
        return torch.addmm(b2, torch.addmm(b1, torch.relu(h), w1).relu_(), w2)

    def set_site(self, col: int, indices: torch.Tensor) -> None:
        """Feed the chosen (B,) codes at `col` of the current row to the first layer."""
        first = self.layers[0]
        torch.index_select(self.embedding, 0, indices, out=self.rows[0][col + first.h_pad])

    def reorder(self, order: torch.Tensor) -> None:
        """Make batch item i a copy of item order[i], the grid and every cached state alike,
        in place (the site plans hold views of them). Items with different conditions must
        not be mixed: the biases are not reordered."""
        self.grid.copy_(self.grid[order])
        for i in range(len(self.layers)):
            self.v_in[i].copy_(self.v_in[i][order])
            self.v_above[i] = self.v_above[i][order]
            self.rows[i].copy_(self.rows[i][:, order])
            self.row_terms[i].copy_(self.row_terms[i][:, order])
        self.output.copy_(self.output[:, order])

    def finish_row(self, r: int) -> None:
        """Recompute every layer's vertical stack at row r, which is now final."""
        self._update_vertical(r, r + 1)

    def _update_vertical(self, start: int, stop: int) -> None:
        """Every layer's vertical stack at rows start..stop−1, all final."""
        x = F.embedding(self.grid[:, start:stop], self.embedding).permute(0, 3, 1, 2)
        width = x.shape[-1]
        for i, layer in enumerate(self.layers):
            pad = layer.reach
            self.v_in[i][:, :, start + pad: stop + pad, pad: pad + width] = x
            v_pre = (layer.v_conv(self.v_in[i][:, :, start: stop + pad])  # (B, 2C, rows, W)
                     + self.v_bias[i][:, :, start: stop])
            x = layer.vertical_output(x, gate(v_pre, dim=1))
            self.v_above[i] = layer.vertical_link(v_pre, x)[:, :, -1:]


# ------------------------------------------- the prior's weights rearranged for site-by-site use
# Shared by the cached sampler here and the CUDA-graph sampler (cuda_graph.py).
def conv_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """A 1×1 convolution's weight as the (C_in, C_out) matrix that right-multiplies rows."""
    return conv.weight.detach()[:, :, 0, 0].t()


def tap_matrices(layer: GatedLayer) -> torch.Tensor:
    """(T, C, 2C): the horizontal convolution's T taps, each a matrix for (B, C) rows."""
    return layer.h_conv.weight.detach()[:, :, 0].permute(2, 1, 0)


def head_matrices(prior: PixelCNN) -> tuple[torch.Tensor, ...]:
    """(W1, b1, W2, b2): the head (ReLU, 1×1, ReLU, 1×1) as logits = relu(relu(h)·W1 + b1)·W2 + b2
    for (B, C) rows h."""
    hidden, last = prior.head[1], prior.head[3]
    return conv_matrix(hidden), hidden.bias.detach(), conv_matrix(last), last.bias.detach()


def site_biases(layer: GatedLayer, bias_v: torch.Tensor, bias_h: torch.Tensor, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's stack biases, (1 or B, 1 or H, 1 or W, 2C) each (`GatedLayer.position_bias`),
    as the terms added at each site: vertical (1 or B, 2C, H, W), the layout of the cache's
    vertical stacks; horizontal with the two convolutions' own biases folded in,
    (H, W, 1 or B, 2C), so that a row's terms are one slice."""
    constant = layer.h_conv.bias + layer.v_to_h.bias
    return (bias_v.expand(-1, height, width, -1).permute(0, 3, 1, 2),
            (bias_h + constant.detach()).expand(-1, height, width, -1).permute(1, 2, 0, 3))


def check_sample_input(indices: torch.Tensor, n_codes: int) -> torch.Tensor:
    if indices.dim() != 3:
        raise ValueError(f"indices must be (B, H, W), got shape {tuple(indices.shape)}")
    bad = (indices < -1) | (indices >= n_codes)
    if bad.any():
        raise ValueError(f"indices must be -1 (to generate) or in [0, {n_codes}), "
                         f"found {indices[bad][0].item()}")
    return indices.clone().long()


def sites_to_fill(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Raster-order sites where at least one batch item has −1."""
    rows, cols = torch.nonzero((indices == -1).any(dim=0), as_tuple=True)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def columns_to_fill(indices: torch.Tensor) -> dict[int, set[int]]:
    """Row → the columns where at least one batch item has −1 (rows with none left out)."""
    columns: dict[int, set[int]] = {}
    for r, c in sites_to_fill(indices):
        columns.setdefault(r, set()).add(c)
    return columns


def _fill_site(out: torch.Tensor, r: int, c: int, logits: torch.Tensor, temperature: float,
               generator: torch.Generator | None, top_p: float = 1.0) -> None:
    """Sample the site (r, c) for the batch items where it is −1, by inverse-CDF sampling.

    One uniform per batch item is drawn whether or not it is used, so any two samplers that
    visit sites in the same order consume the generator identically.
    """
    u = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64,
                   device=logits.device)
    drawn = inverse_cdf(logits, temperature, u, top_p)
    missing = out[:, r, c] == -1
    out[missing, r, c] = drawn[missing]


def inverse_cdf(logits: torch.Tensor, temperature: float, u: torch.Tensor,
                top_p: float = 1.0) -> torch.Tensor:
    """(B, K) logits and (B,) uniforms in [0, 1) → (B,) codes: the bin of the softmax's CDF (in
    float64, at `temperature`, cut to its nucleus where `top_p` < 1) that holds each uniform."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:])
    return drawn.clamp(max=probs.shape[1] - 1).squeeze(1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, K) probabilities with all but each row's nucleus set to zero: its likeliest codes,
    taken in order until they hold `top_p` of the probability (Holtzman et al. 2020), so a
    code is kept when the codes likelier than it hold less than `top_p`. Not renormalised."""
    ranked, order = probs.sort(dim=-1, descending=True)
    kept = (ranked.cumsum(-1) - ranked) < top_p  # the likeliest code is always kept
    return probs * torch.zeros_like(kept).scatter(-1, order, kept)
