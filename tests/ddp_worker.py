"""A few float64 SGD steps of both stages, on one process or under torchrun, for the
data-parallel equivalence test (tests/test_distributed.py).

    python tests/ddp_worker.py OUT.pt                                   # one process
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT.pt

It runs the steps three times from the same start: as the project does them, and broken on
purpose in two ways ("no-sync": DDP skips the all-reduce of the gradients; "same-shard":
every rank trains on rank 0's part of the batch), so the test can show that its comparison
sees ranks that disagree.

Each step uses the project's own pieces: the DDP wrapper, the per-rank shard of the global
batch, the VQ-VAE loss (with its SSIM term) and the quantiser's all-reduced EMA statistics,
codebook start and dead-code restarts; the prior's loss through its DDP wrapper. Rank 0
saves the first step's gradients, and the parameters and buffers after the last step.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainvq.config import StageSettings  # noqa: E402
from brainvq.distributed import (  # noqa: E402
    data_parallel,
    init_distributed,
    is_main,
    leave_distributed,
    shard,
    world,
)
from brainvq.inference.trained_run import to_model_input  # noqa: E402
from brainvq.training.stages import prior_loss, vqvae_losses  # noqa: E402
from dataset import Normalisation  # noqa: E402
from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3
LR = 0.05
BROKEN = ("none", "no-sync", "same-shard")


def images(seed: int = 0) -> torch.Tensor:
    """uint8 (8, 64, 64): smooth blobs with noise, different in every image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = torch.rand(GLOBAL_BATCH, 2, generator=g) * 32 + 16
    blobs = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2)
                      / 200)
    noisy = blobs * 200 + torch.rand(GLOBAL_BATCH, 64, 64, generator=g) * 40
    return noisy.round().to(torch.uint8)


def grids(seed: int = 1) -> torch.Tensor:
    """int64 (8, 8, 8) code grids."""
    return torch.randint(0, 16, (GLOBAL_BATCH, 8, 8), generator=torch.Generator().manual_seed(seed))


def my_part(batch: torch.Tensor, broken: str) -> torch.Tensor:
    """This rank's part of the global batch; "same-shard" gives every rank rank 0's part."""
    if broken == "same-shard" and world()[1] > 1:
        return batch.tensor_split(world()[1])[0]
    return shard(batch)


def forward_backward(model: torch.nn.Module, loss_of_batch: Callable[[], torch.Tensor],
                     broken: str) -> None:
    """Loss and gradients; "no-sync" skips DDP's all-reduce of the gradients (DDP decides
    that in the forward pass, so both run inside its context)."""
    quiet = broken == "no-sync" and hasattr(model, "no_sync")
    with model.no_sync() if quiet else contextlib.nullcontext():
        loss_of_batch().backward()


def sgd_steps(model: torch.nn.Module, loss_of_batch: Callable[[], torch.Tensor],
              broken: str) -> dict[str, torch.Tensor]:
    """STEPS plain SGD steps; returns the first step's gradients."""
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    first: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        optimiser.zero_grad(set_to_none=True)
        forward_backward(model, loss_of_batch, broken)
        if step == 0:
            first = {name.removeprefix("module."): p.grad.clone()
                     for name, p in model.named_parameters() if p.grad is not None}
        optimiser.step()
    return first


def train_both_stages(device: torch.device, broken: str) -> dict[str, dict]:
    """STEPS SGD steps of a tiny VQ-VAE and a tiny prior from the same seed; first gradients
    and final states."""
    torch.manual_seed(0)
    norm = Normalisation(mean=0.2, std=0.25)
    settings = StageSettings(epochs=1, batch_size=GLOBAL_BATCH, lr=LR, ssim_weight=1.0)
    # dead_code_steps=1: codes unused in a step are re-seeded at once, so restarts happen too
    vqvae = VQVAE(VQVAEConfig(hidden=(4, 8, 8), n_res_blocks=1, embedding_dim=4, n_codes=16,
                              dead_code_steps=1))
    wrapped = data_parallel(vqvae, device)
    x = to_model_input(my_part(images(), broken), norm, device)
    vqvae_grads = sgd_steps(wrapped, lambda: vqvae_losses(wrapped, x, settings,
                                                                norm)["loss"], broken)

    prior = PixelCNN(PriorConfig(n_codes=16, channels=8, dilations=(1, 2), grid_size=8))
    wrapped_prior = data_parallel(prior, device)
    codes = my_part(grids(), broken).to(device)
    prior_grads = sgd_steps(wrapped_prior, lambda: prior_loss(wrapped_prior, codes), broken)
    return {"vqvae_grads": vqvae_grads, "vqvae_state": vqvae.state_dict(),
            "prior_grads": prior_grads, "prior_state": prior.state_dict()}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_default_dtype(torch.float64)
    device = init_distributed()
    results = {broken: train_both_stages(device, broken) for broken in BROKEN}
    if is_main():
        torch.save({"world_size": world()[1], **results}, out)
    leave_distributed()


if __name__ == "__main__":
    main()
