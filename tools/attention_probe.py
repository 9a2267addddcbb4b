"""Does causal self-attention (PixelSNAIL, Chen et al. 2018) make the run's prior better for the
same CPU time?

Trains, on the run's index grids (with their mirror images where indices.pt holds them, as the
demo preset does), the preset's prior and the same prior with a causal self-attention block after
the gated layers listed by each `--after`, each from the same start for the same wall-clock
budget (`--seconds`: the learning rate's cosine decay runs over time, so a costlier step gets
fewer steps) or for the same number of steps (`--steps`), and reports validation bits per index,
over all sites and over mostly-brain sites. A control lets attention see every site (no causal
mask), the answer included: how far its bits fall shows how much the block can learn in the
budget at all. The block is a probe: the samplers do not run it. Writes
RUN/attention_probe.json.

    python -m tools.attention_probe --run runs/demo --seconds 180 --after 9 --after 4,9
    python -m tools.attention_probe --run runs/demo --steps 1800 --after 9
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainvq.checkpoints import (
    MIRRORED_TRAIN,
    checkpoint_path,
    load_checkpoint,
    load_indices,
    split_positions,
)
from brainvq.cli import script_parser
from brainvq.config import DEFAULT_RUN, PROFILES, StageSettings
from brainvq.data.slices import to_unit
from brainvq.evaluation.run_metrics import mostly_brain_sites
from brainvq.inference.trained_run import surprise_bits
from brainvq.io_utils import RunError, write_json
from brainvq.training.stages import place_prior, prior_loss, prior_training_grids
from dataset import DatasetError, load_splits
from modules import PixelCNN, PriorConfig


class CausalSelfAttention(nn.Module):
    """Residual multi-head attention over the grid in raster order: site i reads sites j ≤ i.
    Safe for a PixelCNN's horizontal stack, whose features at j see only indices before j."""

    def __init__(self, channels: int, heads: int = 2, head_dim: int = 16,
                 causal: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, head_dim, causal
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, channels)
        nn.init.zeros_(self.out.weight)  # starts as no change to the prior
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) horizontal stack, channels last as the prior keeps it."""
        b, height, width, c = h.shape
        x = self.norm(h.reshape(b, height * width, c))  # (B, N, C)
        q, k, v = self.qkv(x).view(b, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, N, d)
        y = self.out(y.transpose(1, 2).reshape(b, height * width, -1))
        return h + y.view(b, height, width, c)


class AttentionPixelCNN(PixelCNN):
    """The gated PixelCNN with a causal self-attention block after each layer in `after`."""

    def __init__(self, cfg: PriorConfig, after: tuple[int, ...], causal: bool = True) -> None:
        super().__init__(cfg)
        self.after = after
        self.attention = nn.ModuleList(CausalSelfAttention(cfg.channels, causal=causal)
                                       for _ in after)

    def forward(self, indices: torch.Tensor, positions: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        v = h = self.embedding(indices)  # (B, H, W, C)
        condition = self.slice_condition(positions, len(indices))
        biases = self.position_biases(*indices.shape[1:], condition, context)
        for i, (layer, bias) in enumerate(zip(self.layers, biases, strict=True)):
            v, h = layer(v, h, bias)
            if i in self.after:
                h = self.attention[self.after.index(i)](h)
        return self.logits(h).permute(0, 3, 1, 2)


def make_prior(cfg: PriorConfig, after: tuple[int, ...], codebook: torch.Tensor,
               causal: bool = True) -> PixelCNN:
    torch.manual_seed(0)
    model = AttentionPixelCNN(cfg, after, causal) if after else PixelCNN(cfg)
    model.embed_like(codebook)
    return place_prior(model, torch.device("cpu"))


def train(model: PixelCNN, grids: torch.Tensor, positions: torch.Tensor, stage: StageSettings,
          steps: int | None = None, seconds: float | None = None) -> tuple[int, float]:
    """AdamW at the stage's learning rate, random batches of its size, its gradient clipping and
    warm-up, then a cosine decay over `steps`, or over `seconds` of wall-clock time (so that every
    variant gets the same CPU time whatever its step costs). Returns the steps taken and the
    seconds they took."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=stage.lr)
    generator = torch.Generator().manual_seed(0)
    start, step = time.perf_counter(), 0
    while True:
        done = step / steps if steps is not None else (time.perf_counter() - start) / seconds
        if done >= 1:
            return step, time.perf_counter() - start
        warmup = min(1.0, (step + 1) / stage.warmup_steps)
        for group in optimiser.param_groups:
            group["lr"] = stage.lr * warmup * 0.5 * (1 + math.cos(math.pi * done))
        batch = torch.randint(0, len(grids), (stage.batch_size,), generator=generator)
        loss = prior_loss(model, grids[batch], positions[batch])
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        optimiser.step()
        step += 1


@torch.no_grad()
def validation_bits(model: PixelCNN, grids: torch.Tensor, positions: torch.Tensor,
                    brain: torch.Tensor) -> dict[str, float]:
    model.eval()
    per_site = torch.cat([surprise_bits(model, g, p)
                          for g, p in zip(grids.split(32), positions.split(32), strict=True)])
    return {"val_bits": per_site.mean().item(), "val_bits_brain": per_site[brain].mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.attention_probe")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.add_argument("--after", action="append", default=[], metavar="I,J",
                   help="gated layers (0-based) followed by attention; repeat for more variants")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=180.0,
                        help="training time of each variant (default 180)")
    budget.add_argument("--steps", type=int, help="training steps of each variant instead")
    args = p.parse_args(argv)
    try:
        indices = load_indices(args.run)
        vqvae = load_checkpoint(checkpoint_path(args.run, "vqvae", "best"))
        val_images = load_splits(Path(vqvae["data_root"]), splits=("validate",))["validate"].images
    except (RunError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg, stage = PROFILES["demo"].prior, PROFILES["demo"].prior_stage
    cfg = replace(cfg, n_codes=indices["n_codes"])
    codebook = vqvae["model"]["quantiser.codebook"]
    grids, positions = prior_training_grids(indices, MIRRORED_TRAIN in indices)
    grids = grids.long()
    val = indices["validate"].long(), split_positions(indices, "validate")
    brain = torch.from_numpy(mostly_brain_sites(to_unit(val_images), val[0].shape[-1]))
    variants = [("preset", (), True)] + [
        (f"attention after {a}", tuple(int(i) for i in a.split(",")), True) for a in args.after]
    variants.append(("control: attention sees every site", (len(cfg.dilations) - 1,), False))
    rows = []
    for name, after, causal in variants:
        model = make_prior(cfg, after, codebook, causal)
        steps, seconds = train(model, grids, positions, stage, args.steps,
                               None if args.steps else args.seconds)
        rows.append({"variant": name, "steps": steps, "seconds": round(seconds, 1),
                     "ms_per_step": round(1000 * seconds / max(steps, 1), 1),
                     **validation_bits(model, *val, brain)})
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in rows[-1].items()), flush=True)
    write_json({"rows": rows, "seconds": args.seconds, "steps": args.steps},
               args.run / "attention_probe.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
