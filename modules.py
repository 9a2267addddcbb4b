"""Models: a VQ-VAE that turns 256×256 slices into a 32×32 grid of code indices, and a gated
PixelCNN prior over that grid. Plain nn.Modules: no I/O, no training loop."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from brainvq.distributed import all_reduce_tensor, broadcast, gather_rows
from brainvq.positions import unknown_positions


# --------------------------------------------------------------------------------------------
# VQ-VAE
# --------------------------------------------------------------------------------------------
@dataclass
class VQVAEConfig:
    in_channels: int = 1
    hidden: tuple[int, ...] = (16, 32, 64)  # widths after each stride-2 stage: 256→128→64→32
    n_res_blocks: int = 2
    embedding_dim: int = 64  # D
    n_codes: int = 512  # K
    beta: float = 0.25  # weight of the commitment loss
    ema: bool = True  # EMA codebook updates instead of the gradient codebook loss
    ema_decay: float = 0.99
    dead_code_steps: int = 20  # a code unused for this many training steps is re-seeded

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if len(self.hidden) != 3:
            raise ValueError(f"hidden needs three widths (8× downsampling), got {self.hidden}")

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.hidden)


class QuantiserOutput(NamedTuple):
    quantised: torch.Tensor  # (B, D, H, W), straight-through: gradients flow to the encoder
    indices: torch.Tensor  # (B, H, W) int64
    loss: torch.Tensor  # codebook + β·commitment
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VectorQuantiser(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    With `ema=True` the codebook follows exponential moving averages of the encoder outputs
    assigned to each code (van den Oord et al. 2017, appendix); otherwise it is a parameter
    trained by the codebook loss. Either way the codebook is first filled with encoder outputs
    and codes unused for `dead_code_steps` training steps are re-seeded from recent outputs.
    All distance and update maths run in fp32, also under autocast.
    """

    def __init__(self, cfg: VQVAEConfig, eps: float = 1e-5) -> None:
        super().__init__()
        n_codes, dim = cfg.n_codes, cfg.embedding_dim
        self.n_codes, self.dim, self.beta, self.ema = n_codes, dim, cfg.beta, cfg.ema
        self.decay, self.dead_code_steps, self.eps = cfg.ema_decay, cfg.dead_code_steps, eps
        codebook = torch.randn(n_codes, dim) / math.sqrt(dim)
        if self.ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(n_codes))
            self.register_buffer("ema_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("steps_unused", torch.zeros(n_codes, dtype=torch.long))

    def nearest_code(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N,) index of the nearest code by Euclidean distance."""
        codebook = at_least_fp32(self.codebook.detach())
        # ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is the same for every code, so it is left out of the argmin.
        distances = codebook.pow(2).sum(1) - 2 * at_least_fp32(flat) @ codebook.t()
        return distances.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) indices → (B, D, H, W) code vectors."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantiserOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantise(at_least_fp32(z))

    def _quantise(self, z: torch.Tensor) -> QuantiserOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B·H·W, D)
        if self.training:
            self._initialise_from(flat)
        indices = self.nearest_code(flat)
        if self.training:
            self._update_codebook(flat.detach(), indices)
        chosen = F.embedding(indices, self.codebook).view(b, h, w, d).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(chosen, z.detach())
        commitment_loss = F.mse_loss(z, chosen.detach())
        loss = commitment_loss * self.beta + (0 if self.ema else codebook_loss)
        quantised = z + (chosen - z).detach()
        return QuantiserOutput(quantised, indices.view(b, h, w), loss,
                               codebook_loss.detach(), commitment_loss.detach())

    @torch.no_grad()
    def _initialise_from(self, flat: torch.Tensor) -> None:
        if bool(self.initialised):
            return
        flat = gather_rows(flat)  # the global batch, so data-parallel runs match one process
        self.codebook.data.copy_(broadcast(_random_rows(flat, self.n_codes)))
        if self.ema:
            self.ema_sum.copy_(self.codebook)
            self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        one_hot = F.one_hot(indices, self.n_codes).type_as(flat)  # (N, K)
        counts, sums = one_hot.sum(0), one_hot.t() @ flat  # (K,), (K, D)
        counts, sums = all_reduce_tensor(counts), all_reduce_tensor(sums)
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.ema_count.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            smoothed = (self.ema_count + self.eps) / (total + self.n_codes * self.eps) * total
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        self._restart_dead_codes(flat, indices)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Re-seed dead codes from this batch's encoder outputs, drawn with probability
        proportional to their quantisation error (k-means++ style): the flat black background
        would otherwise supply most of the picks and the new codes would die again."""
        dead = self.steps_unused >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat, indices = gather_rows(flat), gather_rows(indices)  # every rank has dead codes
        error = (flat - self.codebook[indices]).pow(2).sum(1) + 1e-12
        picks = torch.multinomial(error, n_dead, replacement=error.numel() < n_dead)
        fresh = broadcast(flat[picks])
        self.codebook.data[dead] = fresh
        if self.ema:
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        self.steps_unused[dead] = 0


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32; fp32 and fp64 as they are (a float64 model quantises in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _random_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
    """n distinct rows of `flat`, at random. The black background makes many encoder outputs
    identical; duplicate codes would tie exactly in the nearest-code search, and which of the
    twins wins would then hang on rounding. Missing rows are jittered copies."""
    rows = torch.unique(flat, dim=0)  # sorted: the same on every rank for the same batch
    chosen = rows[torch.randperm(len(rows), device=flat.device)[:n]]
    if len(chosen) < n:
        extra = chosen[torch.randint(len(chosen), (n - len(chosen),), device=flat.device)]
        scale = flat.std().clamp(min=1e-3) * 0.01
        chosen = torch.cat([chosen, extra + torch.randn_like(extra) * scale])
    return chosen


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel. Unlike BatchNorm or GroupNorm it does not
    depend on the batch or the image extent, so a model trained on crops runs unchanged on
    whole slices, and data-parallel replicas compute exactly what one process would."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ChannelNorm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
                         ChannelNorm(c_out), nn.ReLU())


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                         ChannelNorm(c_out), nn.ReLU())


class Encoder(nn.Module):
    """(B, 1, 256, 256) → (B, D, 32, 32)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.hidden
        self.net = nn.Sequential(
            _down(cfg.in_channels, c1), _down(c1, c2), _down(c2, c3),
            *[ResidualBlock(c3) for _ in range(cfg.n_res_blocks)],
            ChannelNorm(c3), nn.ReLU(),
            nn.Conv2d(c3, cfg.embedding_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, 32, 32) → (B, 1, 256, 256), mirroring the encoder with transposed convolutions."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.hidden
        self.net = nn.Sequential(
            nn.Conv2d(cfg.embedding_dim, c3, 3, padding=1),
            *[ResidualBlock(c3) for _ in range(cfg.n_res_blocks)],
            ChannelNorm(c3), nn.ReLU(),
            _up(c3, c2), _up(c2, c1),
            nn.ConvTranspose2d(c1, cfg.in_channels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 1, 256, 256)
    indices: torch.Tensor  # (B, 32, 32)
    vq_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VQVAEConfig()
        self.encoder = Encoder(self.cfg)
        self.quantiser = VectorQuantiser(self.cfg)
        self.decoder = Decoder(self.cfg)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantiser(self.encoder(x))
        return VQVAEOutput(self.decoder(q.quantised), q.indices, q.loss,
                           q.codebook_loss, q.commitment_loss)

    @torch.no_grad()
    def image_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 256, 256) normalised images → (B, 32, 32) code indices."""
        z = self.encoder(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return self.quantiser.nearest_code(flat).view(z.shape[0], z.shape[2], z.shape[3])

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 32, 32) → (B, D, 32, 32) quantised latents."""
        return self.quantiser.lookup(indices)

    @torch.no_grad()
    def indices_to_image(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 32, 32) → (B, 1, 256, 256) decoded images (normalised space)."""
        return self.decoder(self.indices_to_latents(indices))


# --------------------------------------------------------------------------------------------
# Gated PixelCNN prior over the index grid
# --------------------------------------------------------------------------------------------
@dataclass
class PriorConfig:
    n_codes: int = 512  # K, must match the VQ-VAE
    channels: int = 64
    kernel_size: int = 3
    # One gated layer per entry. Doubling dilations let the last site see the whole 32×32 grid
    # (vertical reach = Σ dilation·(k//2) = 32 rows), the dilation-1 layers keep coverage gap-free.
    dilations: tuple[int, ...] = field(default_factory=lambda: (1, 2, 4, 8, 1, 2, 4, 8, 1, 1))
    # Largest grid side with a learned per-site position bias in every layer (0: none): slices
    # are centred, so where a site is says much about its code, beyond the convolutions' reach.
    grid_size: int = 32
    # Slice-position conditioning (conditional PixelCNN): a grid's relative axial position (0:
    # lowest slice, 1: highest) picks a vector interpolated between `slice_bins` learned ones,
    # added in every layer; unknown positions get a learned "unknown" vector. 0: unconditioned.
    slice_bins: int = 0
    # Whole-context conditioning: a non-causal encoder of width `context_channels` reads given
    # indices (−1: hidden) and every layer adds its features, so a hole's sites also see the
    # context after them; given nothing, it adds nothing (tools/context_probe.py). 0: none.
    context_channels: int = 0
    context_dilations: tuple[int, ...] = field(default_factory=lambda: (1, 2, 4, 8))
    # A residual vertical stack whose output the horizontal stack reads a row down: ~0.13 fewer
    # in-brain bits in the same time (docs/experiments.md#a-residual-vertical-stack). False:
    # van den Oord et al.'s layer, which checkpoints saved without this field have.
    vertical_residual: bool = True

    def __post_init__(self) -> None:
        self.dilations = tuple(self.dilations)
        self.context_dilations = tuple(self.context_dilations)
        if self.kernel_size % 2 == 0 or self.kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and ≥ 3, got {self.kernel_size}")
        if self.slice_bins == 1 or self.slice_bins < 0:
            raise ValueError(f"slice_bins must be 0 (unconditioned) or ≥ 2, got "
                             f"{self.slice_bins}")


def gate(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """tanh of the first half of the channels (along `dim`) times the sigmoid of the second."""
    a, b = x.chunk(2, dim=dim)
    return torch.tanh(a) * torch.sigmoid(b)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution of channels-last features (..., C) → (..., C') as a matmul: at the
    prior's widths a CPU runs it, forwards and backwards, faster than its convolution kernel
    (docs/performance.md#the-priors-training-step)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv` of (B, H, W, C) features → (B, H', W', C'). The convolution reads and writes
    channels-last memory, so both permutes are views, not copies."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C): row r receives row r−1 (row 0 receives zeros)."""
    return F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016) without a blind spot, on channels-last
    (B, H, W, C) stacks, which a CPU trains fastest (docs/performance.md#the-priors-training-step).

    The vertical stack at row r sees rows ≤ r; it reaches the horizontal stack shifted one row
    down, so the horizontal stack at (r, c) sees rows < r plus row r at columns ≤ c. In the
    first layer the horizontal input is shifted one column right, so the site itself is never
    seen; later layers only see features that already exclude it.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, first: bool,
                 context: int = 0, vertical_residual: bool = False) -> None:
        super().__init__()
        self.first, self.dilation = first, dilation
        self.vertical_residual = vertical_residual
        self.half = kernel_size // 2
        c = channels
        self.v_conv = nn.Conv2d(c, 2 * c, (self.half + 1, kernel_size), dilation=dilation)
        self.h_conv = nn.Conv2d(c, 2 * c, (1, self.half + 1), dilation=dilation)
        self.v_to_h = nn.Conv2d(c if vertical_residual else 2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.position_to_v = nn.Conv2d(c, 2 * c, 1)
        self.position_to_h = nn.Conv2d(c, 2 * c, 1)
        # zero at first: the context's features start as no change to the prior, and grow
        # only as far as they help (random ones would add noise to every layer)
        self.context_to_v = _zero_conv(context, 2 * c) if context else None
        self.context_to_h = _zero_conv(context, 2 * c) if context else None

    @property
    def reach(self) -> int:
        return self.half * self.dilation

    @property
    def h_pad(self) -> int:
        """Zero columns left of the horizontal input (one more in the first layer: the shift)."""
        return self.reach + int(self.first)

    def forward(self, v: torch.Tensor, h: torch.Tensor,
                bias: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) vertical and horizontal stacks → the next layer's; `bias`: this layer's
        biases for the two stacks (`position_bias`)."""
        r = self.reach
        v_pre = conv_channels_last(self.v_conv, F.pad(v, (0, 0, r, r, r, 0))) + bias[0]
        h_in = F.pad(h, (0, 0, self.h_pad, 0))[:, :, : h.shape[2] + r]
        h_pre = conv_channels_last(self.h_conv, h_in) + bias[1]
        v_out = self.vertical_output(v, gate(v_pre))
        link = pointwise(self.v_to_h, shift_down(self.vertical_link(v_pre, v_out)))
        h_new = pointwise(self.h_out, gate(h_pre + link))
        return v_out, h_new if self.first else h + h_new

    def vertical_output(self, v: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
        """The next vertical stack from this layer's input and gated output (one layout). The
        first layer's input, the embedding, sees the row's later sites: it is never added."""
        return v + gated if self.vertical_residual and not self.first else gated

    def vertical_link(self, v_pre: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
        """What the horizontal stack reads of the vertical one, a row down: the residual
        stack's output (C channels), or van den Oord et al.'s pre-activations (2C)."""
        return v_out if self.vertical_residual else v_pre

    def position_bias(self, position: torch.Tensor | None, condition: torch.Tensor | None = None,
                      context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H, W, C) position embedding, (B, 1, 1, C) slice condition and (1 or B, H, W, C')
        context features, any may be None → biases with 2C channels for the two stacks,
        broadcastable to (B, H, W, 2C)."""
        bias = self.static_bias(position, conditioned=condition is not None)
        for terms in (self.condition_bias(condition), self.context_bias(context)):
            if terms is not None:
                bias = (bias[0] + terms[0], bias[1] + terms[1])
        return bias

    def context_bias(self, context: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(1 or B, H, W, C') context features → their (1 or B, H, W, 2C) terms in the biases."""
        if context is None or self.context_to_v is None:
            return None
        return pointwise(self.context_to_v, context), pointwise(self.context_to_h, context)

    def static_bias(self, position: torch.Tensor | None, conditioned: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of the two stacks' biases that is the same for every grid: the position
        embedding's projections (1, H, W, 2C); without an embedding, the projections' own
        biases where a condition is added (zero otherwise)."""
        return tuple(pointwise(conv, position) if position is not None
                     else conv.bias.view(1, 1, 1, -1) if conditioned
                     else conv.weight.new_zeros(1, 1, 1, conv.out_channels)
                     for conv in (self.position_to_v, self.position_to_h))

    def condition_bias(self, condition: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, 1, 1, C) slice condition → its (B, 1, 1, 2C) terms in the two stacks' biases.
        The projections are linear, so the condition is projected once per grid, not added to
        the position embedding and projected at every site."""
        if condition is None:
            return None
        return tuple(F.linear(condition, conv.weight.flatten(1))
                     for conv in (self.position_to_v, self.position_to_h))


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 1×1 convolution without bias whose weights start at zero."""
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    nn.init.zeros_(conv.weight)
    return conv


class PixelCNN(nn.Module):
    """Autoregressive prior p(indices) = Π p(i_rc | earlier sites in raster order)."""

    def __init__(self, cfg: PriorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or PriorConfig()
        c = self.cfg.channels
        self.embedding = nn.Embedding(self.cfg.n_codes, c)
        self.layers = nn.ModuleList(
            GatedLayer(c, self.cfg.kernel_size, d, first=i == 0,
                       context=self.cfg.context_channels,
                       vertical_residual=self.cfg.vertical_residual)
            for i, d in enumerate(self.cfg.dilations))
        self.context_encoder = ContextEncoder(self.cfg) if self.cfg.context_channels else None
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, 2 * c, 1), nn.ReLU(),
                                  nn.Conv2d(2 * c, self.cfg.n_codes, 1))
        g = self.cfg.grid_size
        self.position = nn.Parameter(torch.randn(1, c, g, g) * 0.1) if g else None
        bins = self.cfg.slice_bins
        self.slice_embedding = nn.Embedding(bins + 1, c) if bins else None  # last: unknown
        if self.slice_embedding is not None:
            nn.init.normal_(self.slice_embedding.weight, std=0.1)

    def slice_condition(self, positions: torch.Tensor | None,
                        batch: int) -> torch.Tensor | None:
        """(B,) relative slice positions in [0, 1] (NaN: unknown) → (B, 1, 1, C) conditioning
        vectors; None for an unconditioned prior."""
        if self.slice_embedding is None:
            return None
        table, bins = self.slice_embedding.weight, self.cfg.slice_bins
        if positions is None:
            positions = unknown_positions(batch, like=table)
        positions = positions.to(table)
        scaled = positions.nan_to_num(0.0).clamp(0, 1) * (bins - 1)
        low = scaled.floor().long().clamp(max=bins - 2)
        weight = (scaled - low)[:, None]
        vectors = table[low] * (1 - weight) + table[low + 1] * weight
        vectors = torch.where(positions.isfinite()[:, None], vectors, table[bins])
        return vectors[:, None, None, :]

    def position_biases(self, height: int, width: int, condition: torch.Tensor | None = None,
                        context: torch.Tensor | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (vertical, horizontal) biases for a height × width grid, channels last:
        the per-site position embedding plus the slice condition (B, 1, 1, C) and the context's
        features, if any; `context` (B, H, W): given indices, −1 hidden (None: the plain
        prior)."""
        position = self.position_grid(height, width)
        features = self.context_features(context)
        return [layer.position_bias(position, condition, features) for layer in self.layers]

    def context_features(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """(B, H, W) given indices (−1: hidden) → (B, H, W, C') features of the context encoder;
        None without a context or an encoder (the plain prior)."""
        if context is None or self.context_encoder is None:
            return None
        return self.context_encoder(context).permute(0, 2, 3, 1)

    def position_grid(self, height: int, width: int) -> torch.Tensor | None:
        """The learned per-site embedding (1, height, width, C), or None without one."""
        if self.position is None:
            return None
        if height > self.position.shape[2] or width > self.position.shape[3]:
            raise ValueError(f"grid {height}×{width} exceeds grid_size {self.cfg.grid_size}")
        return self.position[:, :, :height, :width].permute(0, 2, 3, 1)

    @torch.no_grad()
    def embed_like(self, codebook: torch.Tensor) -> None:
        """Start the input embedding from the VQ-VAE's codebook (K, D): its leading principal
        components, scaled like the default init (channels beyond D keep theirs). Codes with
        nearby vectors decode to similar patches; starting them with nearby embeddings lets what
        the prior learns about one code carry over to its neighbours."""
        if codebook.shape[0] != self.cfg.n_codes:
            raise ValueError(f"codebook has {codebook.shape[0]} codes, the prior "
                             f"{self.cfg.n_codes}")
        weight = self.embedding.weight
        components = principal_components(codebook.float(), weight.shape[1])
        n = components.shape[1]
        weight[:, :n] = (components * weight.std()).to(weight)

    def forward(self, indices: torch.Tensor, positions: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) indices, (B,) relative slice positions (None or NaN: unknown) and (B, H, W)
        given context (−1: hidden; None or all hidden: the plain prior) → (B, K, H, W) logits;
        the logits at a site see earlier sites and the context only. Given a context, only the
        logits at its hidden sites mean anything: the prior learnt nothing about the given
        ones."""
        v = h = self.embedding(indices)  # (B, H, W, C)
        condition = self.slice_condition(positions, len(indices))
        biases = self.position_biases(*indices.shape[1:], condition, context)
        for layer, bias in zip(self.layers, biases, strict=True):
            v, h = layer(v, h, bias)
        return self.logits(h).permute(0, 3, 1, 2)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last horizontal stack (B, H, W, C) → (B, H, W, K) logits: `head` (ReLU, 1×1,
        ReLU, 1×1), its convolutions as matmuls."""
        return pointwise(self.head[3], F.relu(pointwise(self.head[1], F.relu(h))))

    def bits_per_index(self, indices: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood in bits per index (the training loss)."""
        return bits(self(indices, positions), indices, reduction="mean")


class ContextEncoder(nn.Module):
    """Given indices (B, H, W), −1 hidden → features (B, C', H, W) that see the whole grid:
    an embedding with a "hidden" entry, then residual dilated 3×3 convolutions whose reach
    (Σ dilations) spans a hole, so a site's features tell what lies below and right of it.
    Less the features of an all-hidden grid: with nothing given, the prior is the plain one."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        c = cfg.context_channels
        self.hidden = cfg.n_codes  # the embedding's last row
        self.embedding = nn.Embedding(cfg.n_codes + 1, c)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=d, dilation=d)
                                   for d in cfg.context_dilations)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        hidden = torch.full_like(context[:1], -1)
        features = self.encode(torch.cat([context, hidden]))
        return features[:-1] - features[-1:]

    def encode(self, context: torch.Tensor) -> torch.Tensor:
        x = self.embedding(context.where(context >= 0, self.hidden)).permute(0, 3, 1, 2)
        for conv in self.convs:
            x = x + conv(F.relu(x))
        return x


def bits(logits: torch.Tensor, indices: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """(B, K, H, W) logits, (B, H, W) indices → −log₂ p(index) at every site, (B, H, W): the
    prior's surprise; with reduction="mean", their mean: the prior's loss."""
    # over (B·H·W, K) rows: the prior's logits are a channels-last view (PixelCNN.forward)
    n_codes = logits.shape[1]
    nats = F.cross_entropy(logits.movedim(1, -1).reshape(-1, n_codes), indices.reshape(-1),
                           reduction=reduction)
    return (nats if reduction != "none" else nats.view(indices.shape)) / math.log(2)


def principal_components(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, D) rows → (N, min(n, D, N)) their coordinates along the leading principal axes,
    each scaled to unit standard deviation."""
    centred = (x - x.mean(0)).double()
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)  # axes: (min(N, D), D)
    # An axis's sign is arbitrary (the SVD routine picks it): fix it, largest entry positive,
    # so the embedding does not depend on that choice.
    largest = axes.gather(1, axes.abs().argmax(1, keepdim=True))
    axes = axes * largest.sign()
    coords = centred @ axes[:n].t()
    return (coords / coords.std(0, keepdim=True).clamp(min=1e-8)).to(x.dtype)
