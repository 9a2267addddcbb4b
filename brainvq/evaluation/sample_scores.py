"""Scores for generated slices that can tell anatomy from texture, and their sanity baselines.

- `c2st_accuracy`: a classifier two-sample test; a small CNN's held-out accuracy at telling two
  sets of slices apart (0.5: indistinguishable, 1.0: always told apart).
- `c2st_patch_accuracy`: the same test on full-resolution patches from inside the brain, for
  texture, which the whole slices' 64×64 view cannot resolve.
- `unigram_grids` / `chimera_grids`: code grids that must fail it. Unigram grids draw each site
  from that position's marginal (texture without structure); chimeras join the top half of one
  real grid to the bottom half of a real grid from a distant level (real parts, wrong anatomy).
- A slice-position regressor (`train_position_regressor`, `predict_positions`, `features`) and
  `frechet_distance`, the Fréchet distance between Gaussians fitted to its features (the FID
  formula in this regressor's feature space, not Inception's: not comparable with FIDs).
- The two-sample test's classifier can start from that regressor (`backbone`): trained on the
  training split, its convolutions already encode anatomy, which a classifier trained from
  scratch on ~100 slices a side does not learn.

Everything trains on CPU in seconds: slices are area-downsampled to 64×64 first.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg, ndimage

INPUT_SIZE = 64  # slices are area-downsampled to this: anatomy survives, training stays cheap
FEATURES = 64  # width of the encoder's last hidden layer (the Fréchet feature space)
# Fixed, so that results do not depend on the machine; and two threads crawl on a busy 2-core box.
THREADS = 1
CHIMERA_MIN_GAP = 0.3  # relative slice positions of a chimera's halves differ by at least this
# (epochs, learning rate) of the classifier, from scratch and on the frozen backbone; chosen on
# the sanity cases (docs/results.md#how-much-one-seed-says)
C2ST_SCRATCH = (30, 3e-3)
C2ST_ON_BACKBONE = (60, 3e-2)
# texture test: 48² patches caught blurred and unigram slices where 32² ones did not
# (docs/results.md#texture-at-full-resolution)
PATCH_SIZE = 48
PATCHES_PER_SLICE = 16
TISSUE_LEVEL = 8  # uint8: the decoder leaves the background at 0–7
C2ST_PATCHES = (30, 1e-2)
# The whole-slice test: 128² slices with their left-right difference, five strided
# convolutions down to 4×4 (docs/results.md#the-whole-slice-test)
SLICE_SIZE = 128
SLICE_WIDTHS = (8, 16, 32, 64, 64)
FRECHET_EPS = 1e-6  # added to the covariances' diagonals when their product's root is singular


# ---------------------------------------------------------------- shared plumbing


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` torch threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def seeded_torch(seed: int, threads: int) -> Iterator[None]:
    """Run the block on `threads` threads with torch's RNG seeded; the caller's RNG state is
    restored afterwards."""
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def to_input(images: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 or float [0, 1] (N, H, W) slices → float32 (N, 1, size, size), centred on 0."""
    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    x = F.interpolate(x.unsqueeze(1), size=(size, size), mode="area")
    return x - 0.5


class SliceEncoder(nn.Module):
    """(B, 1 or 2, size, size) slices → (B, FEATURES) features → (B,) one output per slice.

    Strided convolutions, one per entry of `widths`, then a fully connected layer: flattening
    rather than pooling keeps where each structure lies, which is what anatomy is. `mirrored`:
    the slice's left-right difference enters beside it (`prepare`), so the hemispheres'
    likeness is one convolution away."""

    def __init__(self, size: int = INPUT_SIZE, features: int = FEATURES,
                 widths: tuple[int, ...] = (8, 16, 32, 64), mirrored: bool = False) -> None:
        super().__init__()
        self.size, self.mirrored = size, mirrored
        channels = (2 if mirrored else 1, *widths)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        cells = (size // 2 ** len(widths)) ** 2
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * cells, features),
                                    nn.ReLU())
        self.head = nn.Linear(features, 1)

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] slices (N, H, W) → this encoder's input (N, 1 or 2, size, size)."""
        x = to_input(images, self.size)
        return torch.cat([x, x - x.flip(-1)], dim=1) if self.mirrored else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fit(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Loss,
        epochs: int, batch_size: int, lr: float) -> nn.Module:
    """Train `model` on (x, target) with Adam and a one-cycle schedule; run inside `seeded_torch`.

    No augmentation: flips and shifts teach a model to ignore where structures lie, which is
    what tells anatomy (and a slice's level) apart."""
    # the multi-tensor step: the same updates as the per-tensor loop, bit for bit, in less time
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = loss_fn(model(x[batch]), target[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


# ---------------------------------------------------------------- classifier two-sample test


def c2st_accuracy(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, folds: int = 5,
                  seed: int = 0, backbone: SliceEncoder | None = None, epochs: int | None = None,
                  batch_size: int = 32, lr: float | None = None, threads: int = THREADS,
                  groups_a: np.ndarray | None = None,
                  groups_b: np.ndarray | None = None) -> float:
    """Held-out accuracy of a small CNN telling slices `a` from slices `b`, over `folds`
    folds; min(len(a), len(b)) slices of each, chosen with `seed`. NaN where no fold can be
    scored (one group a side: holding one out leaves that side nothing to learn from).

    `backbone`: a SliceEncoder trained on other data (the position regressor) whose
    convolutions the classifier keeps frozen, training only its fully connected layers: with
    ~100 slices a side that is what gives the test power on anatomy (`C2ST_ON_BACKBONE`).
    `groups_a` / `groups_b` (one label per slice, e.g. its subject) keep each group in one fold:
    neighbouring slices of one subject are near-duplicates, and split between training and
    held-out data they would let the classifier recognise slices instead of telling the sides
    apart."""
    n = min(len(a), len(b))
    if n < folds:
        raise ValueError(f"c2st needs at least {folds} slices per side; got {len(a)}, {len(b)}")
    default_epochs, default_lr = C2ST_SCRATCH if backbone is None else C2ST_ON_BACKBONE
    epochs = default_epochs if epochs is None else epochs
    lr = default_lr if lr is None else lr
    with seeded_torch(seed, threads):
        pick = torch.Generator().manual_seed(seed)
        chosen = [torch.randperm(len(side), generator=pick)[:n].numpy() for side in (a, b)]
        prepare = to_input if backbone is None else backbone.prepare
        x = torch.cat([prepare(np.asarray(side)[rows])
                       for side, rows in zip((a, b), chosen, strict=True)])
        if backbone is not None:  # frozen convolutions: each slice's output is computed once
            x = batched(backbone.convs.eval(), x)
        labels = torch.cat([torch.zeros(n), torch.ones(n)])
        fold_of = group_folds([g for g in (groups_a, groups_b) if g is not None], folds, pick)
        fold = torch.cat([
            torch.randperm(n, generator=pick) % folds if groups is None  # balanced folds
            else torch.tensor([fold_of[g] for g in np.asarray(groups)[rows]])
            for groups, rows in zip((groups_a, groups_b), chosen, strict=True)])
        return held_out_accuracy(x, labels, fold, folds, lambda: classifier(backbone), epochs,
                                 batch_size, lr)


def held_out_accuracy(x: torch.Tensor, labels: torch.Tensor, fold: torch.Tensor, folds: int,
                      make_model: Callable[[], nn.Module], epochs: int, batch_size: int,
                      lr: float) -> float:
    """Accuracy over the held-out folds of a fresh `make_model()` trained on the others to tell
    label 0 from 1; a fold with nothing held out, or one class only to learn from, is skipped
    (NaN if all are). Run inside `seeded_torch`."""
    correct = scored = 0
    for k in range(folds):
        train, held = fold != k, fold == k
        if not held.any() or labels[train].unique().numel() < 2:
            continue
        model = fit(make_model(), x[train], labels[train], F.binary_cross_entropy_with_logits,
                    epochs, batch_size, lr)
        predicted = batched(model, x[held]) > 0
        correct += int((predicted == labels[held].bool()).sum())
        scored += int(held.sum())
    return correct / scored if scored else float("nan")


def classifier(backbone: SliceEncoder | None) -> nn.Module:
    """A fresh SliceEncoder; or, for slices already through `backbone`'s frozen convolutions,
    a copy of its fully connected layers with a zeroed output layer."""
    if backbone is None:
        return SliceEncoder()
    model = nn.Sequential(copy.deepcopy(backbone.hidden), copy.deepcopy(backbone.head),
                          nn.Flatten(0))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    return model


def c2st_patch_accuracy(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0,
                        groups_a: np.ndarray | None = None, groups_b: np.ndarray | None = None,
                        size: int = PATCH_SIZE, per_slice: int = PATCHES_PER_SLICE,
                        epochs: int = C2ST_PATCHES[0], lr: float = C2ST_PATCHES[1],
                        batch_size: int = 64, threads: int = THREADS) -> float:
    """The two-sample test on texture: held-out accuracy of a small CNN, trained from scratch,
    telling full-resolution `size`² patches from inside the brain of uint8 slices `a` (N, H, W)
    from those of `b`, `per_slice` patches a slice. Each slice's patches stay in one fold, and
    with `groups_a` / `groups_b` (one label per slice) each group's. NaN where no fold can be
    scored."""
    with seeded_torch(seed, threads):
        rng = np.random.default_rng(seed)
        sides = [brain_patches(np.asarray(side), rng, size, per_slice) for side in (a, b)]
        x = torch.cat([torch.as_tensor(patches) for patches, _ in sides]).float()
        x = x.unsqueeze(1) / 255 - 0.5
        labels = torch.cat([torch.full((len(patches),), float(k))
                            for k, (patches, _) in enumerate(sides)])
        groups = [np.asarray([f"{name}{i}" for i in range(len(side))] if given is None
                             else given)[owner]
                  for name, side, given, (_, owner) in zip("ab", (a, b), (groups_a, groups_b),
                                                           sides, strict=True)]
        fold_of = group_folds(groups, folds, torch.Generator().manual_seed(seed))
        fold = torch.tensor([fold_of[g] for g in np.concatenate(groups)], dtype=torch.long)
        return held_out_accuracy(x, labels, fold, folds, lambda: SliceEncoder(size), epochs,
                                 batch_size, lr)


def brain_patches(images: np.ndarray, rng: np.random.Generator, size: int = PATCH_SIZE,
                  per_slice: int = PATCHES_PER_SLICE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W) slices → (M, size, size) full-resolution patches that lie wholly inside
    the brain (its outline, ventricles included), `per_slice` of them at random places in each
    slice, and (M,) the slice each came from; a slice with no room for one gives none."""
    patches, owner = [], []
    for i, image in enumerate(images):
        corners = inside_corners(image, size)
        if len(corners):
            for y, x in corners[rng.integers(len(corners), size=per_slice)]:
                patches.append(image[y: y + size, x: x + size])
            owner += [i] * per_slice
    return (np.stack(patches) if patches else np.zeros((0, size, size), np.uint8),
            np.asarray(owner, dtype=int))


def inside_corners(image: np.ndarray, size: int) -> np.ndarray:
    """(K, 2) top-left corners of the `size`² windows of a uint8 slice that lie wholly inside
    its brain: the tissue above `TISSUE_LEVEL` with its holes (the ventricles) filled."""
    brain = ndimage.binary_fill_holes(image > TISSUE_LEVEL)
    sums = np.pad(brain.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # sums[y, x]: brain[:y, :x]
    window = sums[size:, size:] - sums[:-size, size:] - sums[size:, :-size] + sums[:-size, :-size]
    return np.argwhere(window == size * size)


def group_folds(groups: list[np.ndarray], folds: int, generator: torch.Generator) -> dict:
    """A fold for every group named in `groups` (one array per side): each side's groups dealt
    round-robin in a random order, so that every fold holds out about as many groups of one
    side as of the other. Dealt together, five subjects a side could leave a fold with two of
    one side and none of the other: a classifier that learnt nothing then votes for the side
    it saw more of, and scores far below chance on that fold. A group on both sides keeps the
    fold it was dealt first."""
    fold_of: dict = {}
    for side in groups:
        names = [name for name in np.unique(side) if name not in fold_of]
        order = torch.randperm(len(names), generator=generator).tolist()
        fold_of.update({names[i]: k % folds for k, i in enumerate(order)})
    return fold_of


# ---------------------------------------------------------------- baselines that must fail


def unigram_grids(grids: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, H, W) grids with each site drawn independently from that position's code histogram
    over `grids` (N, H, W)."""
    # Copying site (r, c) from a uniformly chosen real grid is drawing from its histogram.
    flat = torch.as_tensor(grids).long().flatten(1)  # (N, H·W)
    source = torch.randint(len(flat), (n, flat.shape[1]), generator=generator)
    sampled = flat.gather(0, source)
    return sampled.view(n, *grids.shape[1:])


def chimera_grids(grids: torch.Tensor, positions: np.ndarray | torch.Tensor, n: int,
                  generator: torch.Generator, min_gap: float = CHIMERA_MIN_GAP) -> torch.Tensor:
    """(n, H, W) grids: the top half (rows < H/2) of a real grid, the bottom half of another
    whose relative slice position differs by at least `min_gap`."""
    grids = torch.as_tensor(grids).long()
    top, bottom = chimera_pairs(torch.as_tensor(positions, dtype=torch.float64), n, generator,
                                min_gap)
    half = grids.shape[1] // 2
    return torch.cat([grids[top, :half], grids[bottom, half:]], dim=1)


def chimera_pairs(positions: torch.Tensor, n: int, generator: torch.Generator,
                  min_gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) indices of top-half and bottom-half donors at least `min_gap` apart in position."""
    far = (positions[:, None] - positions[None, :]).abs() >= min_gap  # (N, N)
    partners = far.sum(1)
    if not partners.any():
        raise ValueError(f"No two slices lie {min_gap} apart in relative position.")
    top = torch.multinomial((partners > 0).double(), n, replacement=True, generator=generator)
    bottom = torch.multinomial(far[top].double(), 1, generator=generator).squeeze(1)
    return top, bottom


# ---------------------------------------------------------------- slice-position regressor


def slice_encoder() -> SliceEncoder:
    """The whole-slice test's encoder: 128² slices beside their left-right difference."""
    return SliceEncoder(SLICE_SIZE, widths=SLICE_WIDTHS, mirrored=True)


def train_position_regressor(images: np.ndarray | torch.Tensor,
                             positions: np.ndarray | torch.Tensor, *, epochs: int = 15,
                             seed: int = 0, batch_size: int = 32, lr: float = 1e-2,
                             threads: int = THREADS,
                             encoder: Callable[[], SliceEncoder] = SliceEncoder) -> SliceEncoder:
    """A small CNN (a fresh `encoder()`) regressing each slice's relative axial position in
    [0, 1]."""
    # L1 at lr 1e-2 read held-out levels best of L1, MSE and smooth L1 on the demo set
    target = torch.as_tensor(np.asarray(positions), dtype=torch.float32)
    with seeded_torch(seed, threads):
        model = encoder()
        return fit(model, model.prepare(images), target, F.l1_loss, epochs, batch_size, lr)


def predict_positions(model: SliceEncoder, images: np.ndarray | torch.Tensor,
                      threads: int = THREADS) -> np.ndarray:
    """(N,) predicted relative positions of (N, H, W) slices."""
    with torch_threads(threads):
        return batched(model.eval(), model.prepare(images)).numpy()


def features(model: SliceEncoder, images: np.ndarray | torch.Tensor,
             threads: int = THREADS) -> np.ndarray:
    """(N, FEATURES) penultimate-layer features of the regressor for (N, H, W) slices."""
    with torch_threads(threads):
        return batched(model.eval().features, model.prepare(images)).numpy().astype(np.float64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, F) and (M, F) feature sets:
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½).

    Estimated from samples it is biased upwards, more so for fewer samples: compare distances
    only at equal sizes, and against two real sets of that size."""
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    root = covariance_product_root(cov_a, cov_b)
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    return float(max(distance, 0.0))  # rounding can take an exact 0 a hair below


def covariance_product_root(cov_a: np.ndarray, cov_b: np.ndarray) -> np.ndarray:
    """Real part of (Σa Σb)^½, with FRECHET_EPS on the diagonals if the product is singular."""
    # Dead ReLU units and fewer samples than features make singular covariances; sqrtm then
    # warns, or returns NaNs, and the offset costs about FRECHET_EPS · F in the distance.
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(cov_a @ cov_b)
        except linalg.LinAlgWarning:
            root = np.full_like(cov_a, np.nan)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * FRECHET_EPS
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # a tiny imaginary part is rounding in sqrtm of a product of symmetric PSD matrices
    return root.real
