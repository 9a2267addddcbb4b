"""The cached PixelCNN sampler replayed as one CUDA graph per grid shape.

On a GPU the project's cached sampler (`sampling.sample(method="fast")`) is bound by kernel
launches: over a hundred tiny kernels per site, 1024 sites
in sequence. Here everything one call does after drawing its random numbers (every row's
vertical update, every site's horizontal step, the head and the inverse-CDF draw) is one
sequence of ordinary PyTorch ops on static buffers, ~73 kernels per site. On CUDA that sequence
is captured once as a graph per (prior weights, batch, grid shape, sites to fill, temperature,
device) and replayed; on the CPU it simply runs eagerly, which is how the tests check it
against a naive sampler fed the same uniforms.

The uniforms are drawn with the caller's generator before the replay, one site at a time exactly
as the project's `_fill_site` draws them, so the generator ends in the same state as after the
project's sampler and, rounding aside, the grids are those it gives with the same generator.
A slice-conditioned prior's condition enters as one (B, 2C) term per layer and stack, written
into static buffers before each run or replay (the slice positions are data, not part of the
graph): added to each row's horizontal terms and to each row's vertical pre-activations, so
it costs no kernel per site.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from brainvq.inference.sampling import (
    check_sample_input,
    conv_matrix,
    head_matrices,
    inverse_cdf,
    site_biases,
    sites_to_fill,
    tap_matrices,
)
from modules import GatedLayer, PixelCNN

# Each graph holds its buffers: at the full profile on 32×32 grids ~0.8 GB at batch 16,
# ~6 GB at batch 256 (H100, peak allocated).
MAX_CACHED_GRAPHS = 4

Site = tuple[int, int]


# --------------------------------------------------------------------------------- public API
def sample_with_cuda_graph(prior: PixelCNN, indices: torch.Tensor, temperature: float = 1.0,
                           generator: torch.Generator | None = None,
                           positions: torch.Tensor | None = None) -> torch.Tensor:
    """Fill every −1 in `indices` (B, H, W) at (B,) relative slice `positions` (None or NaN:
    unknown; ignored by an unconditioned prior) as the project's sampler does; keep the rest.

    On CUDA the first call for a new (weights, shape, sites, temperature) captures a graph,
    later calls only replay it; elsewhere the same steps run eagerly. TF32 is off throughout.
    """
    grid = check_sample_input(indices, prior.cfg.n_codes)
    sites = sites_to_fill(grid)
    if not sites:
        return grid
    uniforms = draw_uniforms(grid, generator)
    with torch.no_grad(), fp32_math():
        if grid.device.type != "cuda":
            return _run_eagerly(prior, grid, sites, temperature, uniforms, positions)
        return _cached_graph(prior, grid, sites, temperature).replay(grid, uniforms, positions)


def draw_uniforms(indices: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(n_sites, B) float64: one uniform per batch item per site to fill, in raster order.

    Drawn one site at a time as `_fill_site` draws them (a single draw of all of them would
    split the stream differently on CUDA), so the generator advances exactly as in the
    project's sampler.
    """
    n_sites = len(sites_to_fill(indices))
    uniforms = torch.empty(n_sites, indices.shape[0], dtype=torch.float64,
                           device=indices.device)
    for row in uniforms:
        row.uniform_(generator=generator)
    return uniforms


@torch.no_grad()
def naive_sample_with_uniforms(prior: PixelCNN, indices: torch.Tensor, temperature: float,
                               uniforms: torch.Tensor,
                               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: one forward pass per site as `sample(method="naive")`, with given uniforms."""
    out = check_sample_input(indices, prior.cfg.n_codes)
    with fp32_math():
        for (r, c), u in zip(sites_to_fill(out), uniforms, strict=True):
            # rows > r cannot matter
            logits = prior(out[:, : r + 1].clamp(min=0), positions)[:, :, r, c]
            drawn = inverse_cdf(logits, temperature, u)
            missing = out[:, r, c] == -1
            out[missing, r, c] = drawn[missing]
    return out


@torch.no_grad()
def sample_with_static_step(prior: PixelCNN, indices: torch.Tensor, temperature: float,
                            uniforms: torch.Tensor,
                            positions: torch.Tensor | None = None) -> torch.Tensor:
    """The graph's steps run eagerly on any device, with given uniforms (for tests)."""
    grid = check_sample_input(indices, prior.cfg.n_codes)
    sites = sites_to_fill(grid)
    if not sites:
        return grid
    with fp32_math():
        return _run_eagerly(prior, grid, sites, temperature, uniforms, positions)


@contextlib.contextmanager
def fp32_math() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN inside, the caller's settings restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def clear_graph_cache() -> None:
    """Drop every captured graph and the GPU memory its buffers hold."""
    _GRAPHS.clear()


# ------------------------------------------------------------------------- the static steps
class _Step(NamedTuple):
    """One layer's work at one column: views into the static buffers and the weights."""

    taps: torch.Tensor  # (B, T·F): the T slots the layer's horizontal conv reads
    w_taps: torch.Tensor  # (T·F, 2C)
    w_taps_t: torch.Tensor  # (2C, T·F): the same, stored transposed (another cuBLAS kernel)
    pre: torch.Tensor  # (B, 2C): holds the term from above and the biases on entry
    pre_a: torch.Tensor  # (B, C): its tanh half
    slot: torch.Tensor  # (B, F): the site's own slot [h | gated | 1 | 0…]
    gated: torch.Tensor  # (B, C): view of `slot`
    w_out: torch.Tensor  # (F, C)
    b_out: torch.Tensor  # (C,): h_out's bias, for the matmul with a bias epilogue
    nxt: torch.Tensor  # (B, C): the next layer's input at the site, or the last output


class _StaticSampler:
    """The cached sampler's computation (`_SamplingCache`), rearranged into few kernels on
    buffers made once, for one set of sites.

    Layer i keeps its horizontal input along the current row as slots (B, d, n, F): padded
    column p lives at [p % d, p // d], so the T taps of a site at dilation d are T consecutive
    slots, one strided (B, T·F) matrix: one matmul. A slot holds [h (C) | gated (C) | 1 | 0…]:
    the layer writes its gated value next to the residual input, so the output 1×1 conv, its
    bias and the residual are one matmul too. Zero weights meet the other features. A site then
    costs per layer: matmul, tanh, glu, matmul; and the head and the draw: ~13 kernels.
    The vertical stacks are updated once per row, as matmuls over gathered patches.
    """

    def __init__(self, prior: PixelCNN, grid: torch.Tensor, fill: torch.Tensor,
                 uniforms: torch.Tensor, temperature: float, sites: list[Site]) -> None:
        """`grid` (B, H, W) is filled in place by `run`; `fill` (B, H, W) marks its −1 entries,
        `uniforms` (n_sites, B) one row per site. All three may be overwritten between runs."""
        self.grid, self.fill, self.uniforms, self.temperature = grid, fill, uniforms, temperature
        self.layers: list[GatedLayer] = list(prior.layers)
        self.embedding = prior.embedding.weight.detach()  # (K, C)
        self.site_index = {site: k for k, site in enumerate(sites)}
        self.columns: dict[int, int] = {}  # row → columns to advance (up to the last to fill)
        for r, c in sites:
            self.columns[r] = max(self.columns.get(r, 0), c + 1)
        self.first_row, self.last_row = min(self.columns), max(self.columns)
        b, height, width = grid.shape
        self.c = c = prior.cfg.channels
        self.f = f = 4 * math.ceil((2 * c + 1) / 4)  # 16-byte aligned slots for cuBLAS
        zeros = self.embedding.new_zeros
        self.slots = [zeros(b, layer.dilation, -(-(layer.h_pad + width) // layer.dilation), f)
                      for layer in self.layers]
        for slots in self.slots:
            slots[..., 2 * c] = 1
        # channels last, so a row's conv patches are one strided view: one copy, one matmul
        self.v_in = [zeros(b, layer.reach + height, width + 2 * layer.reach, c)
                     for layer in self.layers]
        self.no_row_above = [zeros(b, width, layer.v_to_h.in_channels) for layer in self.layers]
        self.v_above = list(self.no_row_above)  # each layer's vertical link at the last final row
        self.terms = [zeros(width, b, 2 * c) for _ in self.layers]  # (W, B, 2C) per layer
        # (B, 2C) per layer: the slice condition's terms in the vertical and horizontal biases
        self.conditioned = prior.slice_embedding is not None
        self.condition_v = [zeros(b, 2 * c) for _ in self.layers] if self.conditioned else []
        self.condition_h = [zeros(b, 2 * c) for _ in self.layers] if self.conditioned else []
        self.output = zeros(b, c)  # the last layer's horizontal stack at the current site
        self.scratch = zeros(b, c)
        self.tap_variant = self.out_variant = 0
        self._derive_weights(prior, height, width)
        self.steps = [self._plan(col) for col in range(width)]
        first = self.layers[0]
        self.first_h = [self._slot(0, col + first.h_pad)[:, :c] for col in range(width)]
        self.first_row_h = self.slots[0].view(b, -1, f)[:, :, :c]  # (B, d·n, C)
        self.first_row_at = torch.tensor([self._slot_number(0, col + first.h_pad)
                                          for col in range(width)], device=grid.device)

    def _derive_weights(self, prior: PixelCNN, height: int, width: int) -> None:
        """Weights rearranged for right-multiplying rows, and the per-site bias terms."""
        self.w_taps = [_tap_matrix(layer, self.f) for layer in self.layers]  # (T·F, 2C)
        # the same, stored transposed: `_tap_matmul`'s other variant gets another cuBLAS kernel
        self.w_taps_t = [w.t().contiguous() for w in self.w_taps]  # (2C, T·F)
        self.w_out = [_out_matrix(layer, self.f) for layer in self.layers]
        self.w_vertical = [_vertical_matrix(layer) for layer in self.layers]  # (T·k·C, 2C)
        self.v_to_h = [conv_matrix(layer.v_to_h) for layer in self.layers]  # (C or 2C, 2C)
        self.v_bias, self.h_bias = [], []  # (H, W, 2C); (H, W, 1, 2C) with both conv biases
        position = prior.position_grid(height, width)
        for layer in self.layers:
            static = (b.detach() for b in layer.static_bias(position, self.conditioned))
            bias_v, bias_h = site_biases(layer, *static, height, width)
            self.v_bias.append(bias_v[0].permute(1, 2, 0))
            self.h_bias.append(bias_h)
        self.head = head_matrices(prior)

    def set_condition(self, prior: PixelCNN, positions: torch.Tensor | None) -> None:
        """Write the condition terms of (B,) relative slice positions into their buffers."""
        if not self.conditioned:
            return
        condition = prior.slice_condition(positions, self.grid.shape[0])  # (B, 1, 1, C)
        for layer, out_v, out_h in zip(self.layers, self.condition_v, self.condition_h,
                                       strict=True):
            term_v, term_h = layer.condition_bias(condition)  # (B, 1, 1, 2C) each
            out_v.copy_(term_v.flatten(1))
            out_h.copy_(term_h.flatten(1))

    def _slot_number(self, i: int, p: int) -> int:
        d = self.layers[i].dilation
        return (p % d) * self.slots[i].shape[2] + p // d

    def _slot(self, i: int, p: int) -> torch.Tensor:
        """(B, F) slot of padded column p in layer i."""
        d = self.layers[i].dilation
        return self.slots[i][:, p % d, p // d]

    def _plan(self, col: int) -> list[_Step]:
        """`_SamplingCache._site_plan` on the slot layout: one (B, T·F) view of a column's taps."""
        plan, c = [], self.c
        for i, layer in enumerate(self.layers):
            d, t = layer.dilation, layer.half + 1
            taps = self.slots[i][:, col % d, col // d: col // d + t]  # (B, T, F)
            slot = self._slot(i, col + layer.h_pad)
            if i + 1 < len(self.layers):
                nxt = self._slot(i + 1, col + self.layers[i + 1].h_pad)[:, :c]
            else:
                nxt = self.output
            pre = self.terms[i][col]
            plan.append(_Step(taps.view(taps.shape[0], -1), self.w_taps[i],
                              self.w_taps_t[i], pre, pre[:, :c], slot,
                              slot[:, c: 2 * c], self.w_out[i], layer.h_out.bias.detach(), nxt))
        return plan

    def run(self, max_rows: int | None = None) -> None:
        """Fill `grid` in place; `max_rows`: stop after that many rows with sites (warm-up)."""
        self.v_above = list(self.no_row_above)
        if self.first_row > 0:
            self._update_vertical(0, self.first_row)
        done = 0
        for r in range(self.first_row, self.last_row + 1):
            if r in self.columns:  # a row with nothing to fill needs only its vertical stack
                self._start_row(r)
                for col in range(self.columns[r]):
                    self._advance(col)
                    if (r, col) in self.site_index:
                        self._sample(r, col)
                done += 1
                if done == max_rows:
                    return
            if r < self.last_row:
                self._update_vertical(r, r + 1)

    def _start_row(self, r: int) -> None:
        """`_SamplingCache.start_row`, the slice condition added to each layer's terms."""
        embedded = F.embedding(self.grid[:, r].clamp(min=0), self.embedding)  # (B, W, C)
        self.first_row_h.index_copy_(1, self.first_row_at, embedded)
        for i in range(len(self.layers)):
            above = self.v_above[i].transpose(0, 1)  # (W, B, C or 2C)
            torch.add(above @ self.v_to_h[i], self.h_bias[i][r], out=self.terms[i])
            if self.conditioned:
                self.terms[i] += self.condition_h[i]  # (B, 2C) over every column

    def _advance(self, col: int) -> None:
        """`_SamplingCache.advance` as four kernels a layer: matmul, tanh, glu, matmul."""
        for step in self.steps[col]:
            self._tap_matmul(step, self.tap_variant)
            step.pre_a.tanh_()
            torch.ops.aten.glu.out(step.pre, -1, out=step.gated)  # tanh(a)·sigmoid(b)
            self._out_matmul(step, self.out_variant)

    def _tap_matmul(self, step: _Step, variant: int) -> None:
        """pre += taps @ w_taps; the variants differ only in the cuBLAS kernel they get."""
        step.pre.addmm_(step.taps, step.w_taps if variant == 0 else step.w_taps_t.t())

    def _out_matmul(self, step: _Step, variant: int) -> None:
        """nxt = slot @ w_out, by one of three formulations (see `tune`)."""
        if variant == 0:
            torch.mm(step.slot, step.w_out, out=step.nxt)
        elif variant == 1:
            step.nxt.zero_()
            step.nxt.addmm_(step.slot, step.w_out)
        else:  # the bias as a matmul epilogue: a different (cuBLASLt) heuristic
            c = self.c
            torch.addmm(step.b_out, step.slot[:, : 2 * c], step.w_out[: 2 * c], out=self.scratch)
            step.nxt.copy_(self.scratch)

    def tune(self) -> None:
        """Pick the fastest formulation of the two per-layer matmuls on this GPU.

        cuBLAS picks kernels by heuristics, and for these skinny fp32 products some picks are
        far off: on an H100 `mm` of (16, 260) by (260, 128) got a split-K kernel taking 53 µs
        where other formulations take ~5 µs, while at batch 256 it was the fastest.
        """
        step = self.steps[0][len(self.layers) // 2]
        taps = [_time_in_graph(lambda v=v: self._tap_matmul(step, v)) for v in range(2)]
        outs = [_time_in_graph(lambda v=v: self._out_matmul(step, v)) for v in range(3)]
        self.tap_variant, self.out_variant = taps.index(min(taps)), outs.index(min(outs))

    def _sample(self, r: int, col: int) -> None:
        """Head, inverse-CDF draw where the site is −1, and the code fed to the first layer."""
        w1, b1, w2, b2 = self.head
        hidden = torch.addmm(b1, self.output.relu_(), w1).relu_()
        logits = torch.addmm(b2, hidden, w2)  # (B, K)
        drawn = inverse_cdf(logits, self.temperature, self.uniforms[self.site_index[r, col]])
        site = self.grid[:, r, col]
        torch.where(self.fill[:, r, col], drawn, site, out=site)
        torch.index_select(self.embedding, 0, site, out=self.first_h[col])

    def _update_vertical(self, start: int, stop: int) -> None:
        """`_SamplingCache._update_vertical` with the convolution as one matmul a layer.

        The vertical conv is a matmul over gathered patches: cuDNN's fp32 kernels for these
        one-row outputs were several times slower, and at batch 256 the sampler's bottleneck.
        """
        x = F.embedding(self.grid[:, start:stop], self.embedding)  # (B, rows, W, C)
        b, rows, width, c = x.shape
        for i, layer in enumerate(self.layers):
            v_in, pad, d = self.v_in[i], layer.reach, layer.dilation
            v_in[:, start + pad: stop + pad, pad: pad + width] = x
            s_b, s_h, s_w, _ = v_in.stride()
            patches = v_in.as_strided(  # (B, rows, W, T, k, C): input rows start..stop+pad
                (b, rows, width, layer.half + 1, 2 * layer.half + 1, c),
                (s_b, s_h, s_w, d * s_h, d * s_w, 1), v_in.storage_offset() + start * s_h)
            v_pre = torch.addmm(layer.v_conv.bias, patches.reshape(b * rows * width, -1),
                                self.w_vertical[i]).view(b, rows, width, -1)
            v_pre += self.v_bias[i][start:stop]  # (B, rows, W, 2C)
            if self.conditioned:
                v_pre += self.condition_v[i][:, None, None]
            a, g = v_pre.chunk(2, dim=-1)
            x = layer.vertical_output(x, torch.tanh(a) * torch.sigmoid(g))
            self.v_above[i] = layer.vertical_link(v_pre, x)[:, -1]


def _vertical_matrix(layer: GatedLayer) -> torch.Tensor:
    """(T·k·C, 2C): the vertical conv's weight, rows ordered as the patches' (T, k, C)."""
    weight = layer.v_conv.weight.detach()  # (2C, C, T, k)
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])


def _tap_matrix(layer: GatedLayer, f: int) -> torch.Tensor:
    """(T·F, 2C): the horizontal conv's taps, reading the h part of T consecutive slots."""
    taps = tap_matrices(layer)  # (T, C, 2C)
    t, c, two_c = taps.shape
    matrix = taps.new_zeros(t, f, two_c)
    matrix[:, :c] = taps
    return matrix.view(t * f, two_c)


def _out_matrix(layer: GatedLayer, f: int) -> torch.Tensor:
    """(F, C): slot [h | gated | 1 | 0…] → h + h_out(gated), or h_out(gated) in layer 0."""
    weight, bias = layer.h_out.weight.detach()[:, :, 0, 0], layer.h_out.bias.detach()
    c = weight.shape[0]
    matrix = weight.new_zeros(f, c)
    if not layer.first:
        matrix[:c] = torch.eye(c, dtype=weight.dtype, device=weight.device)
    matrix[c: 2 * c] = weight.t()
    matrix[2 * c] = bias
    return matrix


def _time_in_graph(fn: Callable[[], None], reps: int = 20) -> float:
    """Milliseconds per call of `fn` replayed from a CUDA graph, launch gaps included."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # warm-up: handles, workspaces, kernels
        graph.capture_begin()
        for _ in range(reps):
            fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _run_eagerly(prior: PixelCNN, grid: torch.Tensor, sites: list[Site], temperature: float,
                 uniforms: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    steps = _StaticSampler(prior, grid, grid == -1, uniforms, temperature, sites)
    steps.set_condition(prior, positions)
    steps.run()
    return grid


# ----------------------------------------------------------------------------- CUDA graphs
class _GraphSampler:
    """One captured graph: static inputs (grid, fill mask, uniforms, condition terms), the whole
    sequence of steps, and the grid as static output."""

    def __init__(self, prior: PixelCNN, grid: torch.Tensor, sites: list[Site],
                 temperature: float) -> None:
        self.prior = prior  # keeps the weights the graph reads alive
        self.grid, self.fill = grid.clone(), grid == -1
        self.uniforms = grid.new_zeros(len(sites), grid.shape[0], dtype=torch.float64)
        self.steps = _StaticSampler(prior, self.grid, self.fill, self.uniforms, temperature,
                                    sites)
        self.steps.tune()
        # Warm-up on a side stream, as the CUDA graph docs ask: creates the cuBLAS handles and
        # workspaces and loads every kernel the capture will record.
        side = torch.cuda.Stream(grid.device)
        side.wait_stream(torch.cuda.current_stream(grid.device))
        with torch.cuda.stream(side):
            self.steps.run(max_rows=2)
        torch.cuda.current_stream(grid.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.steps.run()

    def replay(self, grid: torch.Tensor, uniforms: torch.Tensor,
               positions: torch.Tensor | None) -> torch.Tensor:
        self.grid.copy_(grid)
        torch.eq(grid, -1, out=self.fill)
        self.uniforms.copy_(uniforms)
        self.steps.set_condition(self.prior, positions)
        self.graph.replay()
        return self.grid.clone()


_GRAPHS: OrderedDict[tuple, _GraphSampler] = OrderedDict()


def _weights_key(prior: PixelCNN) -> tuple:
    """Changes when any weight is replaced or updated in place: the graph reads copies of
    rearranged weights, which would go stale."""
    return tuple((p.data_ptr(), p._version) for p in prior.parameters())


def _cached_graph(prior: PixelCNN, grid: torch.Tensor, sites: list[Site],
                  temperature: float) -> _GraphSampler:
    """The graph for this prior, batch, grid shape, sites and temperature: captured once."""
    owner = (id(prior), _weights_key(prior))
    key = (*owner, tuple(grid.shape), str(grid.device), tuple(sites), float(temperature))
    if key in _GRAPHS:
        _GRAPHS.move_to_end(key)
        return _GRAPHS[key]
    for stale in [k for k in _GRAPHS if k[0] == owner[0] and k[1] != owner[1]]:
        del _GRAPHS[stale]  # this prior's weights changed: its old graphs are useless
    while len(_GRAPHS) >= MAX_CACHED_GRAPHS:
        _GRAPHS.popitem(last=False)
    _GRAPHS[key] = _GraphSampler(prior, grid, sites, temperature)
    return _GRAPHS[key]
