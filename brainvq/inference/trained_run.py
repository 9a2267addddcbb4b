"""A trained run put to use: its models rebuilt from their checkpoints, images ↔ code indices,
and the prior's uses (sampling, full-context inpainting and the mean of fills, surprise, bits
per index)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainvq.checkpoints import checkpoint_path, load_prior, load_run_vqvae
from brainvq.config import InpaintSettings
from brainvq.data.slices import IMAGE_SIZE
from brainvq.data.volumes import VOLUME_SPACING_MM
from brainvq.distributed import all_reduce_sum, shard
from brainvq.inference.cuda_graph import sample_with_cuda_graph
from brainvq.inference.masks import given_after_holes
from brainvq.inference.sampling import sample, sample_particles
from brainvq.io_utils import RunError
from brainvq.positions import unknown_positions
from dataset import Normalisation
from modules import VQVAE, PixelCNN, bits

MEAN_CHUNK_IMAGES = 256  # decoded images held at once by `Run.decode_mean`


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the quantiser keeps fp32 itself); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def to_model_input(images: torch.Tensor, norm: Normalisation,
                   device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) → normalised float (B, 1, H, W), channels_last on `device`."""
    # Moved as uint8 and normalised there: a quarter of the bytes of float32 to copy to a GPU.
    return norm.normalise(images.to(device)).contiguous(memory_format=torch.channels_last)


def vqvae_batch(device: torch.device) -> int:
    """Slices per VQ-VAE pass when encoding or decoding. On a CPU small batches stay in cache:
    8 ran ~1.5× faster than 64 on the demo machine, with the same indices and images bit for
    bit; a GPU wants large ones."""
    return 8 if device.type == "cpu" else 64


@torch.no_grad()
def encode_images(model: VQVAE, images: torch.Tensor, norm: Normalisation,
                  device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W) → int16 (N, 32, 32) code indices."""
    out = [model.image_to_indices(to_model_input(images[b], norm, device)).cpu()
           for b in torch.arange(len(images)).split(vqvae_batch(device))]
    return torch.cat(out).to(torch.int16)


@torch.no_grad()
def decode_indices(model: VQVAE, indices: torch.Tensor, norm: Normalisation,
                   device: torch.device) -> np.ndarray:
    """(B, 32, 32) indices → (B, 256, 256) images in [0, 1]."""
    images = [model.indices_to_image(b.to(device).long()).float().cpu()
              for b in indices.split(vqvae_batch(device))]
    return norm.denormalise(torch.cat(images))[:, 0].numpy()


def draw(prior: PixelCNN, indices: torch.Tensor, temperature: float,
         generator: torch.Generator | None, method: str = "fast",
         positions: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """`sampling.sample`, replayed as a CUDA graph where that gives the same grids faster: the
    fast method on a GPU, without a nucleus (the graph draws from the whole distribution)."""
    if method == "fast" and indices.is_cuda and top_p >= 1.0:
        return sample_with_cuda_graph(prior, indices, temperature, generator, positions)
    return sample(prior, indices, temperature, generator, method=method, positions=positions,
                  top_p=top_p)


@torch.no_grad()
def evaluate_prior(model: PixelCNN, grids: torch.Tensor, device: torch.device,
                   batch_size: int, positions: torch.Tensor | None = None) -> float:
    """Mean bits per index over a split (each rank scores its share; sums are reduced);
    `positions` (N,): the grids' relative slice positions, for a conditioned prior."""
    model.eval()
    total = 0.0
    for batch in shard(torch.arange(len(grids))).split(batch_size):
        where = None if positions is None else positions[batch].to(device)
        with autocast(device):
            total += model.bits_per_index(grids[batch].long().to(device), where).item() \
                * len(batch)
    return all_reduce_sum({"bits": total})["bits"] / len(grids)


class Run:
    """The trained models of a run folder, rebuilt from their checkpoints alone."""

    def __init__(self, run: Path, device: torch.device, sampler: str = "fast") -> None:
        self.path, self.device, self.sampler = run, device, sampler
        self.vqvae, self.norm, state = load_run_vqvae(run, device)
        self.data_root = Path(state["data_root"])
        self.spacing = state.get("spacing", VOLUME_SPACING_MM)  # of volume data
        self.prior = load_prior(checkpoint_path(run, "prior", "best"), device)
        if self.prior.cfg.n_codes != self.vqvae.cfg.n_codes:
            raise RunError(f"prior of {run} has {self.prior.cfg.n_codes} codes but its VQ-VAE "
                           f"{self.vqvae.cfg.n_codes}: retrain the prior (--stage prior)")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vqvae, images, self.norm, self.device).long()

    def decode(self, indices: torch.Tensor) -> np.ndarray:
        """(B, 32, 32) indices → (B, 256, 256) images in [0, 1]."""
        return decode_indices(self.vqvae, indices, self.norm, self.device)

    def sample(self, indices: torch.Tensor, temperature: float, seed: int,
               positions: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
        """Fill the −1 entries of (B, 32, 32) `indices`, at (B,) relative slice `positions`
        (`top_p` < 1: from each site's nucleus)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        where = None if positions is None else positions.to(self.device)
        return draw(self.prior, indices.to(self.device), temperature, generator,
                    method=self.sampler, positions=where, top_p=top_p).cpu()

    def generate(self, positions: torch.Tensor, temperature: float, seed: int,
                 top_p: float = 1.0) -> torch.Tensor:
        """(n,) relative slice positions → n code grids (n, 32, 32) drawn from scratch, one at
        each position."""
        side = IMAGE_SIZE // self.vqvae.cfg.downsampling
        return self.sample(torch.full((len(positions), side, side), -1), temperature, seed,
                           positions, top_p)

    def inpaint(self, indices: torch.Tensor, seed: int, settings: InpaintSettings,
                positions: torch.Tensor | None = None) -> Fills:
        """Fill the −1 entries from the whole grid: see `inpaint_full_context`."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        where = None if positions is None else positions.to(self.device)
        fills = inpaint_full_context(self.prior, indices.to(self.device), settings.candidates,
                                     settings.gibbs_sweeps, generator, settings.gibbs_proposals,
                                     settings.temperature, self.sampler, where)
        return Fills(fills.raster.cpu(), fills.likeliest_above.cpu(), fills.full.cpu(),
                     fills.candidates.cpu())

    def decode_mean(self, candidates: torch.Tensor) -> np.ndarray:
        """(B, n, 32, 32) fills, n per grid → (B, 256, 256): the pixel-wise mean of their
        decoded images. An estimate of the posterior mean, the image closest to the truth in
        squared error on average, not a sample: it blurs where the fills disagree."""
        n = candidates.shape[1]
        return np.concatenate([self._decoded_mean(chunk)  # a few grids at a time: bounded memory
                               for chunk in candidates.split(max(1, MEAN_CHUNK_IMAGES // n))])

    def _decoded_mean(self, candidates: torch.Tensor) -> np.ndarray:
        decoded = self.decode(candidates.flatten(0, 1))
        return decoded.reshape(*candidates.shape[:2], *decoded.shape[1:]).mean(1)

    def surprise(self, indices: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 32, 32) indices → (B, 32, 32) bits: −log₂ p(index | earlier indices)."""
        where = unknown_positions(len(indices)) if positions is None else positions
        return torch.cat([surprise_bits(self.prior, b.to(self.device), p.to(self.device)).cpu()
                          for b, p in zip(indices.split(32), where.split(32), strict=True)])


# ------------------------------------------------------------------ prior: whole-grid uses
@dataclass
class Fills:
    """Completions of (B, H, W) grids with holes: raster-order baselines, the full-context
    fill, and the raster fills themselves (their decoded mean: `Run.decode_mean`)."""
    raster: torch.Tensor  # one ancestral sample: each site given only the sites before it
    likeliest_above: torch.Tensor  # of the raster candidates, the one whose hole is likeliest
    full: torch.Tensor  # of the particles, the one whose whole grid is likeliest; Gibbs sweeps
    candidates: torch.Tensor  # (B, n, H, W): the n raster fills the baselines are taken from


@torch.no_grad()
def inpaint_full_context(prior: PixelCNN, indices: torch.Tensor, candidates: int = 16,
                         sweeps: int = 0, generator: torch.Generator | None = None,
                         proposals: int = 2, temperature: float = 1.0, sampler: str = "fast",
                         positions: torch.Tensor | None = None) -> Fills:
    """Fill every −1 in `indices` (B, H, W) using the whole grid, given indices after a hole
    included; given indices are kept.

    Raster order draws each hole site from p(site | earlier sites) and never sees the given
    sites after it. `full` draws `candidates` particles per grid by sequential Monte Carlo
    (`sampling.sample_particles`: resampled by the given sites they pass, so that they follow
    the context right of and between the hole's rows) and keeps the one whose whole grid the
    prior finds likeliest (the given sites below the hole score it too): a point estimate, not
    a sample. `sweeps` Gibbs sweeps then revisit each hole site (see `gibbs_sweeps`). For
    comparison, `raster` is the first of `candidates` plain raster fills and `likeliest_above`
    the one whose hole is likeliest: what choosing a likely fill gives without the context after
    the hole. When no given index follows a hole, raster order already conditions on all of
    them: the first raster fill is every fill. All raster fills are kept as `candidates`.
    `positions` (B,): relative slice positions, for a conditioned prior.
    """
    holes = indices == -1
    if positions is None:
        positions = unknown_positions(len(indices)).to(indices.device)
    n = candidates
    raster = draw(prior, indices.repeat_interleave(n, 0), temperature, generator,
                  method=sampler, positions=positions.repeat_interleave(n))
    pool = raster.view(-1, n, *raster.shape[1:])
    if not given_after_holes(holes).any():
        first = pool[:, 0]
        return Fills(first, first, first, pool)
    hole_bits = (_pool_bits(prior, raster, positions, n) * holes.flatten(1)[:, None]).sum(2)
    particles = sample_particles(prior, indices, n, temperature, generator, positions)
    full = _choose(particles, _pool_bits(prior, particles, positions, n).sum(2), n)
    full = gibbs_sweeps(prior, full, holes, sweeps, generator, proposals, temperature, positions)
    return Fills(pool[:, 0], _choose(raster, hole_bits, n), full, pool)


def _pool_bits(prior: PixelCNN, pool: torch.Tensor, positions: torch.Tensor,
               n: int) -> torch.Tensor:
    """(B·n, H, W) grids, n per grid → (B, n, H·W) bits at each site."""
    where = positions.repeat_interleave(n)
    return torch.cat([surprise_bits(prior, grids, p) for grids, p in zip(
        pool.split(64), where.split(64), strict=True)]).view(len(positions), n, -1)


def _choose(pool: torch.Tensor, cost: torch.Tensor, n: int) -> torch.Tensor:
    """From (B·n, H, W) grids, n per grid, each grid's one with the lowest (B, n) cost."""
    return pool.view(-1, n, *pool.shape[1:])[torch.arange(len(cost)), cost.argmin(1)]


def gibbs_sweeps(prior: PixelCNN, grids: torch.Tensor, holes: torch.Tensor, sweeps: int,
                 generator: torch.Generator | None, proposals: int, temperature: float,
                 positions: torch.Tensor) -> torch.Tensor:
    """Update each hole site (raster order) of `grids` (B, H, W) `sweeps` times in turn so that
    it follows p(site | every other index).

    p(site = k | rest) ∝ p(k | earlier sites) · Π over later sites s of p(i_s | sites before s).
    Each update draws `proposals` codes from the first factor, the site's own conditional, and
    picks among them and the current code with weights ∝ the second factor (one batched forward
    pass of the whole grid per site). This multiple-proposal step (Tjelmeland 2004; Calderhead
    2014) leaves the full conditional exactly invariant.
    """
    if sweeps < 1:
        return grids
    logits = prior(grids, positions)
    sites = torch.nonzero(holes.any(dim=0)).tolist()  # raster order
    for _ in range(sweeps):
        for r, c in sites:
            items = torch.nonzero(holes[:, r, c]).squeeze(1)
            codes, new_logits = _gibbs_site(prior, grids[items], logits[items], r, c,
                                            proposals, temperature, generator,
                                            positions[items])
            grids[items, r, c] = codes
            logits[items] = new_logits
    return grids


def _gibbs_site(prior: PixelCNN, grids: torch.Tensor, logits: torch.Tensor, r: int, c: int,
                proposals: int, temperature: float, generator: torch.Generator | None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Update site (r, c) of each grid (B, H, W) given everything else; `logits` (B, K, H, W)
    are the prior's for the grids. Returns the new codes and the logits of the new grids."""
    own = torch.softmax(logits[:, :, r, c].double() / temperature, dim=1)
    drawn = torch.multinomial(own, proposals, replacement=True, generator=generator)  # (B, P)
    candidates = torch.cat([grids[:, r, c, None], drawn], dim=1)  # the current code first
    trials = grids.repeat_interleave(proposals, dim=0)
    trials[:, r, c] = drawn.flatten()
    trial_positions = None if positions is None else positions.repeat_interleave(proposals)
    trial_logits = prior(trials, trial_positions)
    later = torch.cat([later_log_likelihood(logits, grids, r, c)[:, None],
                       later_log_likelihood(trial_logits, trials, r, c).view(-1, proposals)], 1)
    pick = torch.multinomial(torch.softmax(later / temperature, dim=1), 1,
                             generator=generator).squeeze(1)
    rows = torch.arange(len(grids), device=grids.device)
    new_logits = logits.clone()
    moved = pick > 0
    new_logits[moved] = trial_logits.unflatten(0, drawn.shape)[rows[moved], pick[moved] - 1]
    return candidates[rows, pick], new_logits


def later_log_likelihood(logits: torch.Tensor, grids: torch.Tensor, r: int,
                         c: int) -> torch.Tensor:
    """(B,) log-likelihood of each grid's sites after (r, c) in raster order, from the prior's
    logits (B, K, H, W): the part of the grid's likelihood that the code at (r, c) changes
    besides its own conditional (earlier sites do not see it)."""
    log_p = -F.cross_entropy(logits, grids, reduction="none").flatten(1)
    return log_p[:, r * grids.shape[2] + c + 1:].double().sum(1)


@torch.no_grad()
def surprise_bits(prior: PixelCNN, indices: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) indices → (B, H, W) −log₂ p(index | earlier indices), from one forward pass."""
    return bits(prior(indices, positions), indices)
