"""What a run folder holds and how its files are named and read back: each stage's checkpoints,
the index grids between the stages, the run's settings. A checkpoint alone rebuilds its model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from brainvq.io_utils import RunError, load_checkpoint
from brainvq.positions import unknown_positions
from dataset import Normalisation
from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig

STAGES = ("vqvae", "decoder", "prior")  # in the order train.py runs them
INDICES_FILE = "indices.pt"  # every split encoded by the best VQ-VAE: the prior's data
CONFIG_FILE = "config.json"
MIRRORED_TRAIN = "train_mirrored"  # indices.pt's split of mirrored training slices, if any


def checkpoint_path(run: Path, stage: str, which: str) -> Path:
    """run/{stage}_{which}.pt, `which` being "last" (to resume) or "best" (by validation)."""
    return Path(run) / f"{stage}_{which}.pt"


def refuse_overwrite(run: Path, stage: str, overwrite: bool, resume: bool) -> None:
    if checkpoint_path(run, stage, "last").exists() and not (overwrite or resume):
        raise RunError(f"{run} already holds a trained {stage}: pass --resume to continue it, "
                       f"--overwrite to start again, or --out NEW_DIR")


# Config fields added after checkpoints were first saved, with the value that a checkpoint
# without the field was trained with.
SAVED_BEFORE: dict[type, dict[str, Any]] = {PriorConfig: {"vertical_residual": False}}


def rebuild(path: Path, model_class: type, config_class: type,
            device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model rebuilt from its checkpoint alone (config + weights), in eval mode."""
    state = load_checkpoint(path)
    model = model_class(config_class(**{**SAVED_BEFORE.get(config_class, {}),
                                        **state["model_config"]}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"{path} does not match its own config: {str(err).splitlines()[0]}") \
            from err
    return model.to(device).eval(), state


def load_vqvae(path: Path, device: torch.device) -> tuple[VQVAE, Normalisation, dict[str, Any]]:
    """The VQ-VAE of a checkpoint, with the normalisation it was trained with."""
    model, state = rebuild(path, VQVAE, VQVAEConfig, device)
    return model, Normalisation.from_dict(state["normalisation"]), state


def load_run_vqvae(run: Path, device: torch.device
                   ) -> tuple[VQVAE, Normalisation, dict[str, Any]]:
    """The run's VQ-VAE (vqvae_best.pt) with the decoder refined on its frozen code
    (decoder_best.pt), where the run has one."""
    model, norm, state = load_vqvae(checkpoint_path(run, "vqvae", "best"), device)
    path = checkpoint_path(run, "decoder", "best")
    if path.exists():
        refined = load_checkpoint(path)
        if not torch.equal(refined["codebook"], model.quantiser.codebook.cpu()):
            raise RunError(f"{path} was refined on another VQ-VAE's code: refine this one's "
                           "decoder (--stage decoder --overwrite)")
        model.decoder.load_state_dict(refined["model"])
    return model, norm, state


def load_prior(path: Path, device: torch.device) -> PixelCNN:
    return rebuild(path, PixelCNN, PriorConfig, device)[0]


def load_indices(run: Path) -> dict[str, Any]:
    """run/indices.pt, as `indices_record` wrote it."""
    return load_checkpoint(Path(run) / INDICES_FILE)


def indices_record(vqvae_epoch: int, n_codes: int,
                   splits: dict[str, tuple[torch.Tensor, list[str], torch.Tensor]]
                   ) -> dict[str, Any]:
    """What run/indices.pt holds: per split (grids, names, positions), the int16 (N, 32, 32)
    grids under the split's name, their file names and (N,) relative slice positions (NaN:
    unknown); and the VQ-VAE epoch and codebook size they were encoded with."""
    record: dict[str, Any] = {"vqvae_epoch": vqvae_epoch, "n_codes": n_codes}
    for split, (grids, names, positions) in splits.items():
        record[split] = grids
        record[_names_key(split)] = list(names)
        record[_positions_key(split)] = positions
    return record


def split_positions(indices: dict[str, Any], split: str) -> torch.Tensor:
    """(N,) relative slice positions of a split's grids (NaN: unknown; all NaN for an
    indices.pt written before positions were kept)."""
    return indices.get(_positions_key(split), unknown_positions(len(indices[split])))


def _names_key(split: str) -> str:
    return f"{split}_names"


def _positions_key(split: str) -> str:
    return f"{split}_positions"
