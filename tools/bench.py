"""Benchmarks, all from one command on one machine: the cached PixelCNN sampler against the naive
one and against a single forward pass, VQ-VAE training against a seed-style baseline, and the
prior's training step with its 1×1 layers as matmuls against the same step as convolutions.

Every measured piece runs in a fresh spawned process, one after another, so that each reports
its own peak memory and no two compete for the cores.

    python -m tools.bench --quick              # under 3 minutes on a 2-core CPU
    python -m tools.bench                      # real naive sampling at every batch: slow
    python -m tools.bench --part prior-step    # the prior's training step alone: a minute
    python -m tools.bench --markdown docs/bench.json   # its table, for docs/performance.md
    # on a GPU:
    python -m tools.bench --profile full --batches 1 16 64 256 --out docs/bench_gpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dataset
from brainvq.cli import script_parser
from brainvq.config import PROFILES
from brainvq.data.slices import IMAGE_SIZE
from brainvq.distributed import choose_device
from brainvq.inference.trained_run import draw
from brainvq.io_utils import write_json
from modules import VQVAE, PixelCNN, PriorConfig

# Spawned children re-import this file, so its top imports only what sampling needs; the
# training stages (matplotlib) and metrics.py (scikit-image) are imported where they are used.

BATCHES = (1, 16, 64)
GRID = 32  # the VQ-VAE's 32×32 index grid
PROBE_ROWS = (0, 15, 31)  # quick mode: rows where the naive sampler is timed
PROBE_SITES = 2  # sites timed in each probe row (its first columns)
QUICK_TRAIN_IMAGES = 256
SEED_BATCH = 128  # the seed report's DataLoader batch
TARGETS = {"speedup_at_16": 50.0, "fast_over_floor_at_64": 5.0, "epoch_time_ratio": 0.5}


# --------------------------------------------------------------------------- fresh processes
def in_fresh_process(fn: Callable[..., dict], *args: Any) -> dict:
    """fn(*args) in a new spawned interpreter; its result gains that process's peak memory."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_with_peak_memory, fn, args, torch.get_num_threads()).result()


def _with_peak_memory(fn: Callable[..., dict], args: tuple, threads: int) -> dict:
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # progress bars
        result = fn(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def idle() -> dict:
    """Nothing: the peak memory of a child that only imported its modules."""
    return {}


def device() -> torch.device:
    return choose_device("auto")


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (the least disturbed by other load) and the last result."""
    best = float("inf")
    for _ in range(repeats):
        if device().type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device().type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, result


# ---------------------------------------------------------------------------------- sampling
def random_prior(cfg: PriorConfig, seed: int) -> PixelCNN:
    """A prior at random initialisation: sampling time does not depend on the weights."""
    torch.manual_seed(seed)
    return PixelCNN(cfg).to(device()).eval()


def probe_grids(batch: int, n_codes: int, seed: int) -> dict[int, torch.Tensor]:
    """Per probe row, a grid of given codes with −1 at that row's first PROBE_SITES sites."""
    generator = torch.Generator().manual_seed(seed)
    grids = {}
    for row in PROBE_ROWS:
        grid = torch.randint(n_codes, (batch, GRID, GRID), generator=generator)
        grid[:, row, :PROBE_SITES] = -1
        grids[row] = grid
    return grids


def time_sampler(cfg: PriorConfig, method: str, batch: int, seed: int, generate: bool,
                 probe: bool, repeats: int) -> dict:
    """Seconds and grids of `method` for full generation and/or the probe grids."""
    model = random_prior(cfg, seed)

    def sample(grid: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device()).manual_seed(seed)
        return draw(model, grid.to(device()), 1.0, generator, method=method).cpu()

    sample(torch.full((batch, 2, 2), -1))  # warm-up: kernels, allocator
    result: dict[str, Any] = {}
    if generate:
        seconds, grid = timed(lambda: sample(torch.full((batch, GRID, GRID), -1)), repeats)
        result.update(generate_s=seconds, generated=grid)
    if probe:
        result["probe_s"], result["probed"] = {}, {}
        for row, grid in probe_grids(batch, cfg.n_codes, seed).items():
            # best of two: the first call at a new grid height also sets up its kernels
            result["probe_s"][row], result["probed"][row] = timed(lambda g=grid: sample(g), 2)
    return result


def time_forward(cfg: PriorConfig, batch: int, seed: int, repeats: int) -> dict:
    """The floor: one batched forward pass of the prior over whole grids."""
    model = random_prior(cfg, seed)
    grid = torch.randint(cfg.n_codes, (batch, GRID, GRID), device=device())
    with torch.inference_mode():
        model(grid)  # warm-up
        seconds, _ = timed(lambda: model(grid), repeats)
    return {"seconds": seconds}


def extrapolate_naive(probe_s: dict[int, float]) -> float:
    """Naive seconds for a whole grid from the probe rows' seconds per site.

    A naive site at row r costs one forward pass over rows 0..r, so its time is fitted as
    a + b·(r + 1) by least squares and summed over every site of the grid.
    """
    rows = np.array(sorted(probe_s), dtype=float)
    per_site = np.array([probe_s[int(r)] / PROBE_SITES for r in rows])
    slope, intercept = np.polyfit(rows + 1, per_site, 1) if len(rows) > 1 else (0.0, per_site[0])
    return float(GRID * sum(intercept + slope * (r + 1) for r in range(GRID)))


def bench_sampling(cfg: PriorConfig, batch: int, seed: int, quick: bool) -> dict:
    """Naive vs fast vs floor at one batch size, each in its own process."""
    repeats = 2 if quick else 3
    naive = in_fresh_process(time_sampler, cfg, "naive", batch, seed, not quick, quick, 1)
    fast = in_fresh_process(time_sampler, cfg, "fast", batch, seed, True, quick, repeats)
    floor = in_fresh_process(time_forward, cfg, batch, seed, repeats)
    if quick:
        naive_s = extrapolate_naive(naive["probe_s"])
        exact = all(torch.equal(fast["probed"][r], naive["probed"][r]) for r in PROBE_ROWS)
    else:
        naive_s, exact = naive["generate_s"], torch.equal(fast["generated"], naive["generated"])
    return {"batch": batch, "naive_s": naive_s, "naive_extrapolated": quick,
            "fast_s": fast["generate_s"], "speedup": naive_s / fast["generate_s"],
            "floor_s": floor["seconds"], "fast_over_floor": fast["generate_s"] / floor["seconds"],
            "exact_match": exact,
            "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in
                            (("naive", naive), ("fast", fast), ("floor", floor))}}


# ------------------------------------------------------------------ seed-style VQ-VAE baseline
# -------------------------------------------------------------------------- VQ-VAE training
def training_files(root: Path, n_train: int | None, seed: int) -> tuple[list[Path], list[int]]:
    """The train split's files in the loader's order, and the (sorted) indices to train on."""
    files = dataset.list_image_files(dataset.find_split_dirs(root)["train"])
    if n_train is None or n_train >= len(files):
        return files, list(range(len(files)))
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n_train]
    return files, sorted(chosen.tolist())


def validation_ssim(reconstruct: Callable[[torch.Tensor], torch.Tensor],
                    images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean SSIM over uint8 (N, H, W) slices of `reconstruct`: uint8 batch → [0, 1] images."""
    from brainvq.evaluation.metrics import batch_scores, mean_scores

    scores = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            reference = batch.unsqueeze(1).float() / 255
            scores += batch_scores(reference, reconstruct(batch).float().cpu().clamp(0, 1))
    return mean_scores(scores)["ssim"]


def train_project(root: Path, n_train: int | None, epochs: int, seed: int,
                  profile: str) -> dict:
    """This project's VQ-VAE of `profile` trained by train.py's own stage and loop."""
    from brainvq.inference.trained_run import to_model_input
    from brainvq.training import engine, stages

    started = time.perf_counter()
    files, chosen = training_files(root, n_train, seed)
    images = dataset.load_split(files[0].parent).images[chosen]  # uint8 (N, 256, 256)
    val_images = dataset.load_split(dataset.find_split_dirs(root)["validate"]).images
    load_s = time.perf_counter() - started
    cfg = PROFILES[profile].vqvae
    settings = replace(PROFILES[profile].vqvae_stage, epochs=epochs)
    norm = dataset.compute_normalisation(images)
    stages.seed_everything(seed)
    dev = device()
    model = VQVAE(cfg).to(dev).to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as scratch:
        stage = stages.vqvae_stage(
            model, settings, images, norm, stages.RunOptions(Path(scratch), seed), dev,
            monitor="none", evaluate=lambda: {"none": 0.0}, checkpoint_extra=dict,
            after_epoch=lambda *_: None)
        engine.fit(stage, Path(scratch), resume=False)
    epoch_s = [row["train_seconds"] for row in stage.history]
    model.eval()
    ssim = validation_ssim(lambda u8: norm.denormalise(
        model(to_model_input(u8, norm, dev)).reconstruction), val_images)
    n_samples = len(images) * settings.crops_per_image
    return {"epoch_s": epoch_s, "n_train": len(images), "load_s": load_s,
            "crops_per_image": settings.crops_per_image, "crop": settings.crop,
            "batch_size": settings.batch_size, "val_ssim": ssim, "n_validate": len(val_images),
            "steps": math.ceil(n_samples / settings.batch_size) * epochs}


def train_seed_style(root: Path, n_train: int | None, epochs: int, seed: int) -> dict:
    """The seed-style VQ-VAE on the same PNG files: DataLoader decoding each item, Adam."""
    from brainvq.evaluation.baselines import PngSlices, SeedStyleVQVAE, train_seed_style_epoch

    torch.manual_seed(seed)
    files, chosen = training_files(root, n_train, seed)
    loader = torch.utils.data.DataLoader(
        PngSlices([files[i] for i in chosen]), batch_size=SEED_BATCH, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    dev = device()
    model = SeedStyleVQVAE().to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_s = []
    for _ in range(epochs):
        started = time.perf_counter()
        train_seed_style_epoch(model, loader, optimiser, dev)
        epoch_s.append(time.perf_counter() - started)
    model.eval()
    val_images = dataset.load_split(dataset.find_split_dirs(root)["validate"]).images
    ssim = validation_ssim(lambda u8: model((u8.float() / 255).unsqueeze(1).to(dev))[0],
                           val_images)
    return {"epoch_s": epoch_s, "n_train": len(chosen), "batch_size": SEED_BATCH,
            "steps": len(loader) * epochs, "val_ssim": ssim, "n_validate": len(val_images)}


def black_image_ssim(root: Path) -> dict:
    """Validation SSIM of an all-black reconstruction: the score of having learnt nothing but
    the background, which fills half of every slice."""
    images = dataset.load_split(dataset.find_split_dirs(root)["validate"]).images
    return {"ssim": validation_ssim(lambda u8: torch.zeros(len(u8), 1, *u8.shape[1:]), images)}


def throughput(run: dict) -> dict:
    """Mean epoch seconds and slices (image-epochs) per second of a training run."""
    epoch_s = sum(run["epoch_s"]) / len(run["epoch_s"])
    return {**run, "epoch_mean_s": epoch_s, "images_per_s": run["n_train"] / epoch_s}


def bench_training(root: Path, quick: bool, epochs: int, seed: int, profile: str) -> dict:
    n_train = QUICK_TRAIN_IMAGES if quick else None
    project = throughput(in_fresh_process(train_project, root, n_train, epochs, seed, profile))
    crops = (f"{project['crops_per_image']} random {project['crop']}² crops of each"
             if project["crop"] else "each whole")
    baseline = throughput(in_fresh_process(train_seed_style, root, n_train, epochs, seed))
    return {"epochs": epochs, "subset": quick, "n_train": project["n_train"], "profile": profile,
            "definition": (
                "images/s = training slices per epoch / seconds of the epoch's training pass "
                "(data loading, forward, backward, optimiser; no validation). This project "
                f"takes {crops} in-memory uint8 slice per epoch ({pixel_share(project):.0%} of "
                "the pixels of the whole 256² slice, which is about half black background) in "
                "batches of "
                f"{project['batch_size']}; the baseline decodes each 256² slice from its PNG "
                f"file every epoch, in batches of {baseline['batch_size']}"),
            "project": project, "baseline": baseline,
            "epoch_time_ratio": project["epoch_mean_s"] / baseline["epoch_mean_s"],
            "val_ssim_all_black": in_fresh_process(black_image_ssim, root)["ssim"]}


def pixel_share(project: dict) -> float:
    """Pixels the project trains on per slice and epoch, as a share of the whole slice."""
    side = project["crop"] or IMAGE_SIZE  # crop 0: whole slices
    return project["crops_per_image"] * side ** 2 / IMAGE_SIZE ** 2


# --------------------------------------------------------------------- prior training step
PRIOR_STEPS = 40  # timed steps per process, after as many untimed ones


def time_prior_step(profile: str, as_convolutions: bool, seed: int) -> dict:
    """Seconds per training step (forward, backward, clipping, AdamW) of the preset's prior on
    random grids at the preset's batch; `as_convolutions`: its 1×1 layers run as nn.Conv2d
    instead of `modules.pointwise`'s matmuls (the same weights, the same function)."""
    from unittest import mock

    import modules
    from brainvq.training.stages import make_optimiser, prior_loss

    preset = PROFILES[profile]
    batch, cfg = preset.prior_stage.batch_size, preset.prior
    model = random_prior(cfg, seed).train()
    optimiser = make_optimiser(model, preset.prior_stage, device())
    generator = torch.Generator().manual_seed(seed)
    grids = torch.randint(cfg.n_codes, (PRIOR_STEPS, batch, GRID, GRID), generator=generator)
    positions = torch.rand(PRIOR_STEPS, batch, generator=generator)

    def steps() -> None:
        for grid, position in zip(grids.to(device()), positions.to(device()), strict=True):
            loss = prior_loss(model, grid, position)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.prior_stage.grad_clip)
            optimiser.step()

    as_conv = mock.patch.object(modules, "pointwise", modules.conv_channels_last)
    with as_conv if as_convolutions else contextlib.nullcontext():
        steps()  # untimed: the first steps allocate and tune
        seconds, _ = timed(steps)
    return {"step_s": seconds / PRIOR_STEPS}


def bench_prior_step(profile: str, seed: int, repeats: int = 3) -> dict:
    """Both ways of the prior's step, each in fresh processes, alternating."""
    runs: dict[str, list[dict]] = {"matmul": [], "convolution": []}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(in_fresh_process(time_prior_step, profile, name == "convolution",
                                               seed))
    best = {name: min(r["step_s"] for r in rows) for name, rows in runs.items()}
    return {"batch": PROFILES[profile].prior_stage.batch_size, "matmul_step_s": best["matmul"],
            "convolution_step_s": best["convolution"],
            "matmul_over_convolution": best["matmul"] / best["convolution"]}


# ---------------------------------------------------------------------------------- report
def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": threads,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def targets_met(results: dict) -> dict[str, bool]:
    rows = {row["batch"]: row for row in results.get("sampling", {}).get("rows", [])}
    met = {}
    if 16 in rows:
        met["speedup_at_16"] = rows[16]["speedup"] >= TARGETS["speedup_at_16"]
    if 64 in rows:
        met["fast_over_floor_at_64"] = (rows[64]["fast_over_floor"]
                                        <= TARGETS["fast_over_floor_at_64"])
    if "training" in results:
        met["epoch_time_ratio"] = (results["training"]["epoch_time_ratio"]
                                   <= TARGETS["epoch_time_ratio"])
    return met


def render_markdown(results: dict) -> str:
    """bench.json as a markdown "Performance" section naming the machine."""
    m = results["machine"]
    mode = "--quick" if results.get("quick") else "(full)"
    if results.get("profile", "demo") != "demo":
        mode += f" --profile {results['profile']}"
    lines = ["### Performance", "",
             f"`python -m tools.bench {mode}` on {m['cpu']} ({m['cores']} cores, "
             f"{m['threads']} torch thread{'s' if m['threads'] != 1 else ''}, "
             f"device {m['device']}), "
             f"torch {m['torch']}, Python {m['python']}; load average {m['load_average'][0]} "
             "at the start."]
    if "wall_s" in results:
        lines[-1] += f" Wall time {results['wall_s']:.0f} s."
    if results.get("partial"):
        lines[-1] += " **Partial: the run stopped before its end; what follows is what it had.**"
    if "sampling" in results:
        lines += ["", *_sampling_table(results["sampling"])]
    if "training" in results:
        lines += ["", *_training_table(results["training"])]
    if "prior_step" in results:
        step = results["prior_step"]
        lines += ["", f"Prior training step (batch {step['batch']}, forward, backward, AdamW; "
                      f"best of fresh processes): 1×1 layers as matmuls "
                      f"{1000 * step['matmul_step_s']:.1f} ms, as convolutions "
                      f"{1000 * step['convolution_step_s']:.1f} ms; ratio "
                      f"{step['matmul_over_convolution']:.2f}."]
    return "\n".join(lines) + "\n"


def _sampling_table(sampling: dict) -> list[str]:
    lines = ["| Grids (32×32) | Naive s | Fast s | Speedup | Forward pass s | Fast / forward "
             "| Same grids | Peak RSS MB naive / fast / forward |",
             "|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for row in sampling["rows"]:
        star = "*" if row["naive_extrapolated"] else ""
        rss = " / ".join(f"{row['peak_rss_mb'][k]:.0f}" for k in ("naive", "fast", "floor"))
        lines.append(f"| {row['batch']} | {row['naive_s']:.1f}{star} | {row['fast_s']:.2f} | "
                     f"{row['speedup']:.0f}× | {row['floor_s']:.2f} | "
                     f"{row['fast_over_floor']:.1f} | {'yes' if row['exact_match'] else 'NO'} | "
                     f"{rss} |")
    lines += ["", sampling["note"]]
    return lines


def _training_table(training: dict) -> list[str]:
    subset = f"{training['n_train']} training slices" + (" (a subset)" if training["subset"]
                                                         else "")
    lines = [f"| VQ-VAE training, {training['epochs']} epoch(s) on {subset} | Epoch s | "
             "Images/s | Steps | Val SSIM | Peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]
    profile = training.get("profile", "demo")
    crops = ", crops" if training["project"].get("crop", 1) else ""
    for key, name in (("project", f"This project ({profile} config{crops}, AdamW)"),
                      ("baseline", "Seed-style baseline (PNG per item, batch 128)")):
        run = training[key]
        lines.append(f"| {name} | {run['epoch_mean_s']:.1f} | {run['images_per_s']:.1f} | "
                     f"{run['steps']} | {run['val_ssim']:.3f} | {run['peak_rss_mb']:.0f} |")
    lines += ["", f"Epoch time, this project / baseline: {training['epoch_time_ratio']:.2f} "
                  f"(target ≤ {TARGETS['epoch_time_ratio']}). {training['definition']}. "
                  f"Validation SSIM over {training['project']['n_validate']} whole validation "
                  f"slices in [0, 1]; an all-black image scores "
                  f"{training['val_ssim_all_black']:.3f}: a run that scores no more has "
                  "learned nothing yet."]
    return lines


def sampling_note(quick: bool, cfg: PriorConfig, idle_rss_mb: float,
                  profile: str = "demo") -> str:
    prior = (f"the {profile} prior at random initialisation ({len(cfg.dilations)} gated layers, "
             f"{cfg.channels} channels, K = {cfg.n_codes}, position biases)")
    note = (f"Full generation of 32×32 grids by {prior}; "
            "forward pass: one batched pass over whole grids, the floor for any sampler; "
            "times are the best of a few runs.")
    if quick:
        note += (f" *Naive extrapolated: timed on {PROBE_SITES} sites in each of rows "
                 f"{', '.join(map(str, PROBE_ROWS))} (a site at row r costs a forward pass over "
                 "rows 0..r; fitted linearly in r and summed over all 1024 sites). Same grids: "
                 "fast and naive fill those probe sites identically from the same seed.")
    else:
        note += " Same grids: fast and naive generate identical grids from the same seed."
    return note + (f" Peak RSS is per fresh process; one that only imports the code peaks at "
                   f"{idle_rss_mb:.0f} MB.")


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, prog="python -m tools.bench")
    p.add_argument("--quick", action="store_true",
                   help="extrapolate naive sampling; train 1 epoch on a subset")
    p.add_argument("--out", default="docs/bench.json", help="where to write the results")
    p.add_argument("--markdown", metavar="JSON", help="print JSON's Performance table and exit")
    p.add_argument("--part", choices=["all", "sampling", "training", "prior-step"], default="all")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--epochs", type=int, help="training epochs (default: 1 quick, 2 full)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per measured process (0: torch's default). One keeps "
                        "timings steady on a shared machine; every ratio uses the same")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=sorted(PROFILES), default="demo",
                   help="whose prior and VQ-VAE to measure (config.PROFILES)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(render_markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    from brainvq.data.demo import build_demo_dataset, demo_root

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine(torch.get_num_threads()), "quick": args.quick,
                               "profile": args.profile}
    idle_rss = in_fresh_process(idle)["peak_rss_mb"]
    if args.part in ("all", "sampling"):
        cfg = PROFILES[args.profile].prior
        rows = []
        results["sampling"] = {"prior": asdict(cfg), "random_init": True,
                               "naive_extrapolated": args.quick, "idle_rss_mb": idle_rss,
                               "note": sampling_note(args.quick, cfg, idle_rss, args.profile),
                               "rows": rows}
        for batch in args.batches:
            rows.append(bench_sampling(cfg, batch, args.seed, args.quick))
            print(_progress(rows[-1]), flush=True)
            write_partial(results, Path(args.out))
    if args.part in ("all", "training"):
        root = build_demo_dataset(demo_root())
        epochs = args.epochs or (1 if args.quick else 2)
        results["training"] = bench_training(root, args.quick, epochs, args.seed, args.profile)
    if args.part in ("all", "prior-step"):
        results["prior_step"] = bench_prior_step(args.profile, args.seed)
        print(f"prior step: ratio {results['prior_step']['matmul_over_convolution']:.2f}",
              flush=True)
    results["targets"] = {**TARGETS, "met": targets_met(results)}
    results["wall_s"] = time.perf_counter() - started
    write_json(results, Path(args.out))
    print(render_markdown(results), end="")
    print(f"targets met: {results['targets']['met']}; wrote {args.out}")
    return 0


def write_partial(results: dict, path: Path) -> None:
    """The results so far, marked partial: a run stopped by a time limit still leaves them."""
    write_json({**results, "partial": True}, path)


def _progress(row: dict) -> str:
    return (f"batch {row['batch']}: naive {row['naive_s']:.1f}s fast {row['fast_s']:.2f}s "
            f"forward {row['floor_s']:.2f}s exact {row['exact_match']}")


if __name__ == "__main__":
    sys.exit(main())
