"""The training loop every stage shares: deterministic batches, exact resume from any saved step,
graceful stops on SIGINT/SIGTERM, NaN guards, and data-parallel sums (torchrun)."""
from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brainvq.checkpoints import checkpoint_path
from brainvq.distributed import all_reduce_sum, barrier, is_main, shard, unwrap, world
from brainvq.io_utils import RunError, load_checkpoint, save_checkpoint


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the current step finished and a checkpoint was saved."""

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(f"stopped by {signal_name} {where}; checkpoint saved, continue with "
                         "--resume")
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain data (weights_only-loadable)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss], "torch": torch.get_rng_state(),
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------- signals
@contextmanager
def graceful_stop() -> Iterator[dict[str, str]]:
    """While active, SIGINT/SIGTERM only record their name in the yielded dict."""
    received: dict[str, str] = {}

    def record(signum: int, _frame: Any) -> None:
        received["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------- loop
@dataclass
class Stage:
    """One training stage, as the generic loop needs it."""
    name: str
    model: torch.nn.Module  # the module to optimise (possibly DistributedDataParallel)
    optimiser: torch.optim.Optimizer
    scheduler: Any
    epochs: int
    n_samples: int  # training samples per epoch
    batch_size: int  # global batch
    seed: int
    grad_clip: float
    # losses of `model` for a global batch of sample ids, given the epoch's RNG; must hold "loss"
    step: Callable[[torch.nn.Module, torch.Tensor, torch.Generator], dict[str, torch.Tensor]]
    evaluate: Callable[[], dict[str, float]]  # validation row; must hold `monitor`
    monitor: str  # lower is better; picks the best checkpoint
    checkpoint_extra: Callable[[], dict[str, Any]]  # configs etc. saved with every checkpoint
    after_epoch: Callable[[int, dict[str, float], list[dict[str, float]]], None]
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: epoch ends only)
    history: list[dict[str, float]] = field(default_factory=list)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled sample ids for one epoch, reproducible from (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return list(order.split(batch_size))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG a stage's `step` draws from (e.g. crop offsets) during one epoch."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + 1)


def fit(stage: Stage, run: Path, resume: bool) -> None:
    """Train `stage` to its last epoch, checkpointing to run/{name}_{last,best}.pt."""
    position = _resume(stage, run) if resume else {"epoch": 0, "step": 0}
    best = min((row[stage.monitor] for row in stage.history), default=float("inf"))
    with graceful_stop() as received:
        for epoch in range(position["epoch"] + 1, stage.epochs + 1):
            started = time.time()
            sums = _train_epoch(stage, run, epoch, position, received)
            trained = time.time()
            validation = stage.evaluate()
            # train_seconds: this process's share of the epoch (less after a mid-epoch resume)
            timing = {"train_seconds": trained - started, "val_seconds": time.time() - trained,
                      "seconds": time.time() - started}
            position = {"epoch": epoch, "step": 0}
            row = {"epoch": epoch, **{f"train_{k}": v / stage.n_samples for k, v in sums.items()},
                   **validation, "lr": stage.scheduler.get_last_lr()[0], **timing}
            stage.history.append(row)
            is_best = row[stage.monitor] < best
            best = min(best, row[stage.monitor])
            _save(stage, run, position, sums={}, generator=None, is_best=is_best)
            if is_main():
                stage.after_epoch(epoch, row, stage.history)
            barrier()
            if _stop_requested(received):
                raise Interrupted(received.get("signal", "a signal to another rank"),
                                  f"after {stage.name} epoch {epoch}")


def _train_epoch(stage: Stage, run: Path, epoch: int, position: dict[str, Any],
                 received: dict[str, str]) -> dict[str, float]:
    """One epoch from `position` (a mid-epoch resume starts at its saved step)."""
    stage.model.train()
    batches = epoch_batches(stage.n_samples, stage.batch_size, stage.seed, epoch)
    generator = epoch_generator(stage.seed, epoch)
    start, sums = 0, {}
    if position.get("generator") is not None and position["epoch"] == epoch - 1:
        start, sums = position["step"], dict(position["sums"])
        generator.set_state(position["generator"])
    bar = tqdm(range(start, len(batches)), desc=f"{stage.name} {epoch}/{stage.epochs}",
               leave=False, dynamic_ncols=True, disable=not is_main(), initial=start,
               total=len(batches))
    for step in bar:
        losses = stage.step(stage.model, batches[step], generator)
        _optimise(stage, losses["loss"], f"{stage.name} epoch {epoch} step {step + 1}")
        local = {k: v.item() * len(shard(batches[step])) for k, v in losses.items()}
        for key, value in all_reduce_sum(local).items():
            sums[key] = sums.get(key, 0.0) + value
        bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
        done = step + 1
        due = stage.checkpoint_every and done % stage.checkpoint_every == 0
        stop = _stop_requested(received)
        if done < len(batches) and (due or stop):
            _save(stage, run, {"epoch": epoch - 1, "step": done}, sums, generator, False)
            if stop:
                raise Interrupted(received.get("signal", "a signal to another rank"),
                                  f"in {stage.name} epoch {epoch} at step {done}")
    return sums


def _stop_requested(received: dict[str, str]) -> bool:
    """Whether any rank got SIGINT/SIGTERM, so that all ranks stop after the same step."""
    if world()[1] == 1:
        return bool(received)
    return all_reduce_sum({"stop": float(bool(received))})["stop"] > 0


def _optimise(stage: Stage, loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise RunError(f"{stage.name} loss became {loss.item()} at {where}; stopped, and the "
                       "last good checkpoint is kept: lower the learning rate or check the data")
    stage.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if stage.grad_clip:
        torch.nn.utils.clip_grad_norm_(stage.model.parameters(), stage.grad_clip)
    stage.optimiser.step()
    stage.scheduler.step()


def _save(stage: Stage, run: Path, position: dict[str, Any], sums: dict[str, float],
          generator: torch.Generator | None, is_best: bool) -> None:
    """Write run/{name}_last.pt (and _best.pt); only rank 0 writes."""
    if not is_main():
        return
    state = {"model": unwrap(stage.model).state_dict(),
             "optimiser": stage.optimiser.state_dict(),
             "scheduler": stage.scheduler.state_dict(),
             "epoch": position["epoch"], "step_in_epoch": position["step"],
             "partial_sums": sums,
             "epoch_generator": generator.get_state() if generator is not None else None,
             "history": stage.history, "rng": rng_state(), **stage.checkpoint_extra()}
    # best before last: a run killed between the two writes resumes from the older last
    # checkpoint and redoes this step, writing both again; the other order would resume past
    # an epoch whose best checkpoint was never written (and the prior would then train on
    # indices from an older VQ-VAE)
    if is_best:
        save_checkpoint(state, checkpoint_path(run, stage.name, "best"))
    save_checkpoint(state, checkpoint_path(run, stage.name, "last"))


def _resume(stage: Stage, run: Path) -> dict[str, Any]:
    """Load run/{name}_last.pt into the stage; returns the position to continue from."""
    path = checkpoint_path(run, stage.name, "last")
    if not path.exists():
        return {"epoch": 0, "step": 0}
    state = load_checkpoint(path)
    try:
        unwrap(stage.model).load_state_dict(state["model"])
        stage.optimiser.load_state_dict(state["optimiser"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise RunError(f"{path} does not fit this configuration ({str(err).splitlines()[0]}); "
                       "resume with the flags it was trained with, or use --overwrite") from err
    stage.scheduler.load_state_dict(state["scheduler"])
    stage.history[:] = state["history"]
    set_rng_state(state["rng"])
    if is_main():
        print(f"resuming {stage.name} after epoch {state['epoch']}"
              + (f", step {state['step_in_epoch']}" if state["step_in_epoch"] else ""))
    return {"epoch": state["epoch"], "step": state["step_in_epoch"],
            "sums": state["partial_sums"], "generator": state["epoch_generator"]}
