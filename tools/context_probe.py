"""What does the context after a hole tell a run's prior about the hole?

Raster order fills a hole from the indices before it; full-context inpainting (predict.py) can
only add what the given indices after it (right of and below the hole) say beyond those. This
measures that directly. A context encoder (`modules.ContextEncoder`: it reads the whole grid
with the hole hidden, and its features enter every gated layer, starting at zero) is trained on
the run's frozen prior to predict the codes in random rectangular holes; then the bits per
hidden index on the validation split, with and without it, for random holes and for the centre
square that predict.py inpaints. A control trains the same encoder with the hole's own codes
left in its input: it must cut the bits far down, which shows the probe learns what there is to
learn. Writes RUN/context_probe.json.

    python -m tools.context_probe --run runs/demo
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from brainvq.checkpoints import checkpoint_path, load_indices, load_prior, split_positions
from brainvq.cli import script_parser
from brainvq.config import DEFAULT_RUN
from brainvq.distributed import DEVICES, choose_device
from brainvq.inference.masks import centre_square_mask, random_rectangles
from brainvq.io_utils import RunError, write_json
from modules import PixelCNN, PriorConfig, bits

HOLES = ("random", "centre_square")


def with_context_encoder(prior: PixelCNN, channels: int) -> PixelCNN:
    """A copy of `prior` with a context encoder of width `channels`; only the encoder and its
    projections into the layers train (they start at zero: the copy is the prior)."""
    model = PixelCNN(PriorConfig(**{**asdict(prior.cfg), "context_channels": channels}))
    missing = model.load_state_dict(prior.state_dict(), strict=False).missing_keys
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in missing)
    return model.to(next(prior.parameters()).device)


def context_of(grids: torch.Tensor, holes: torch.Tensor, leak: bool) -> torch.Tensor:
    """The encoder's input: the grids with the holes hidden (−1), or, for the control, whole."""
    return grids if leak else grids.masked_fill(holes, -1)


def train_probe(model: PixelCNN, grids: torch.Tensor, positions: torch.Tensor, steps: int,
                batch_size: int, lr: float, leak: bool, seed: int) -> list[float]:
    """Train the context encoder of `model` to predict the codes in random holes of `grids`
    (N, H, W); returns the loss (bits per hidden index) of each step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = grids.device
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(grids), (batch_size,), generator=generator).to(device)
        holes = random_rectangles(batch_size, grids.shape[-1], generator).to(device)
        batch = grids[pick]
        loss = bits(model(batch, positions[pick], context_of(batch, holes, leak)),
                    batch)[holes].mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def hidden_bits(model: PixelCNN, grids: torch.Tensor, positions: torch.Tensor,
                holes: torch.Tensor, leak: bool | None, batch_size: int = 32) -> float:
    """Mean bits per index at the `holes` (N, H, W) of `grids`: given the context (leak False),
    the whole grid (leak True) or neither (None: the plain prior)."""
    model.eval()
    total = 0.0
    for part in torch.arange(len(grids), device=grids.device).split(batch_size):
        g, h = grids[part], holes[part]
        context = None if leak is None else context_of(g, h, leak)
        total += bits(model(g, positions[part], context), g)[h].sum().item()
    return total / holes.sum().item()


def evaluation_holes(grids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """(N, H, W) bool holes per kind: random rectangles (fixed by `seed`), the centre square."""
    n, size = len(grids), grids.shape[-1]
    random = random_rectangles(n, size, torch.Generator().manual_seed(seed))
    centre = centre_square_mask(size, side=size * 3 // 8).expand(n, size, size)  # 12 of 32
    return {"random": random.to(grids.device), "centre_square": centre.to(grids.device)}


def probe(prior: PixelCNN, indices: dict, channels: int, steps: int, batch_size: int,
          lr: float, seed: int, device: torch.device) -> dict:
    """Train the probe and its control on the training grids; their scores on validation."""
    train = indices["train"].long().to(device)
    train_positions = split_positions(indices, "train").to(device)
    val = indices["validate"].long().to(device)
    val_positions = split_positions(indices, "validate").to(device)
    holes = evaluation_holes(val, seed + 1)
    result: dict = {"steps": steps, "batch_size": batch_size, "lr": lr,
                    "context_channels": channels, "n_validate": len(val)}
    models = {}
    for arm, leak in (("context", False), ("leaked", True)):
        models[arm] = with_context_encoder(prior, channels)
        losses = train_probe(models[arm], train, train_positions, steps, batch_size, lr, leak,
                             seed)
        result[f"{arm}_train_bits_last_100"] = sum(losses[-100:]) / len(losses[-100:])
        print(f"{arm}: trained {steps} steps", flush=True)
    for name, where in holes.items():
        row = {"plain_bits": hidden_bits(prior, val, val_positions, where, None),
               "context_bits": hidden_bits(models["context"], val, val_positions, where, False),
               "leaked_bits": hidden_bits(models["leaked"], val, val_positions, where, True)}
        row["context_gain_bits"] = row["plain_bits"] - row["context_bits"]
        row["leaked_gain_bits"] = row["plain_bits"] - row["leaked_bits"]
        result[name] = row
    return result


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.context_probe")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--channels", type=int, default=16, help="the context encoder's width")
    p.add_argument("--steps", type=int, default=600, help="training steps of each encoder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        device = choose_device(args.device)
        torch.manual_seed(args.seed)
        prior = load_prior(checkpoint_path(args.run, "prior", "best"), device)
        result = probe(prior, load_indices(args.run), args.channels, args.steps,
                       args.batch_size, args.lr, args.seed, device)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(result, args.run / "context_probe.json")
    print("| holes | plain prior | with the context | with the hole leaked |")
    print("|---|---|---|---|")
    for name in HOLES:
        row = result[name]
        print(f"| {name} | {row['plain_bits']:.3f} | {row['context_bits']:.3f} | "
              f"{row['leaked_bits']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
