"""How real the generated brains are, by scores that can fail (sample_scores.py), each reported
beside a case that must score well and cases that must score badly:

- `c2st_accuracy`: a classifier two-sample test, generated slices against VQ-VAE
  reconstructions of held-out test slices (both through the same decoder); 0.5 = alike. Its
  folds keep each subject's real slices together (neighbouring slices are near-duplicates).
  `c2st_real_vs_real` (the held-out subjects, validation and test, split at random into two
  halves of subjects, 64 reconstructions a side as for the samples; the mean over
  `REAL_VS_REAL_SPLITS` splits, their sd beside it) must sit near 0.5: one split of five
  subjects against five others says more about those ten subjects than about the test,
  `c2st_unigram` (each site drawn from its position's code histogram) and `c2st_chimera` (top
  half of one real grid, bottom half of a real grid from another level) near 1. The chimeras
  are made from validation grids: made from test grids, their halves would also be in the real
  side and the classifier would learn those slices rather than the anatomy. Where the position
  regressor exists, the classifier is built on its frozen convolutions (features learned from
  the training split), which gives the test power on anatomy at ~64 slices a side.
- `sample_fd`: Fréchet distance in the feature space of a slice-position regressor trained on
  the training split, beside `sample_fd_real_vs_real` (the same random halves of the held-out
  subjects, 64 slices a side: a Fréchet distance estimated from 64 slices is biased upward by
  as much as it is for the samples, so only a real-vs-real value at that size compares).
- `sample_position_mae`: that regressor's error on the positions the samples were generated
  at, beside `test_position_mae` on real test slices.
- `texture_scores` (texture_test.py, not in metrics.json): the two-sample test on
  full-resolution patches from inside the brain, beside real against real (≈ 0.5), blurred
  reconstructions and unigram slices (must be caught) and chimeras (real patches: ≈ 0.5)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from brainvq.data.slices import SliceSet, case_id, relative_positions, to_uint8
from brainvq.evaluation import sample_scores
from brainvq.inference.trained_run import Run

C2ST_FOLDS = 5
# random splits of the held-out subjects that real vs real averages: one says little
# (docs/results.md#how-much-one-seed-says)
REAL_VS_REAL_SPLITS = 8
REAL_VS_REAL_SLICES = 64  # a side, as many as the samples' test compares
SLICE_TEST_SPLITS = 4  # real-vs-real splits the whole-slice test averages
BLUR_SIGMA_PX = 1.0  # the texture test's blurred reconstructions: a texture that must be caught


@dataclass
class RealReference:
    """What generated slices are scored against: held-out real slices (as reconstructions) and
    a position regressor trained on the training split."""
    reconstructions: np.ndarray  # uint8 (N, H, W): the test split through the VQ-VAE
    cases: np.ndarray  # (N,) each slice's case or volume: the two-sample test's folds keep them
    other: np.ndarray  # uint8 (M, H, W): the validation split through the VQ-VAE, other subjects
    other_cases: np.ndarray  # (M,)
    other_grids: torch.Tensor  # (M, 32, 32) the validation split's code grids: chimeras' halves
    other_positions: torch.Tensor  # (M,)
    positions: torch.Tensor  # (N,) relative slice positions of the test slices (NaN: unknown)
    regressor: sample_scores.SliceEncoder | None  # None where no training slice has a position


def real_reference(run: Run, train: SliceSet | None, validate: SliceSet, test: SliceSet,
                   test_reconstructions: np.ndarray, seed: int) -> RealReference:
    """The held-out slices through the VQ-VAE, and the position regressor trained on `train`
    (no training split: none, for scores that do not use it)."""
    regressor = None
    if train is not None:
        train_positions = relative_positions(train.names)
        known = train_positions.isfinite()
        if known.sum() >= 2:
            regressor = sample_scores.train_position_regressor(
                train.images[known].numpy(), train_positions[known].numpy(), seed=seed)
    other_grids = run.encode(validate.images)
    return RealReference(to_uint8(test_reconstructions), _cases(test.names),
                         to_uint8(run.decode(other_grids)), _cases(validate.names), other_grids,
                         relative_positions(validate.names), relative_positions(test.names),
                         regressor)


def _cases(names: list[str]) -> np.ndarray:
    return np.array([case_id(name) or name for name in names])


def sample_positions(reference: RealReference, n: int, seed: int) -> torch.Tensor:
    """(n,) positions to generate at: drawn from the test slices' positions (NaN where those
    are unknown), so that generated and real slices come from the same levels."""
    pick = torch.randint(len(reference.positions), (n,),
                         generator=torch.Generator().manual_seed(seed))
    return reference.positions[pick]


def generated_slices(run: Run, reference: RealReference, n: int, seed: int,
                     temperature: float = 1.0, top_p: float = 1.0
                     ) -> tuple[np.ndarray, torch.Tensor]:
    """n uint8 brains (n, H, W) generated at levels drawn from the test slices' (as
    `sample_positions`), and those levels (n,)."""
    positions = sample_positions(reference, n, seed)
    grids = run.generate(positions, temperature, seed, top_p)
    return to_uint8(run.decode(grids)), positions


def generation_scores(samples: np.ndarray, positions: torch.Tensor,
                      reference: RealReference, seed: int) -> dict[str, float]:
    """c2st, Fréchet distance and position error of uint8 generated slices (N, H, W) that were
    generated at `positions` (N,)."""
    real, cases = _matched_real(reference, len(samples), seed)
    scores = {"c2st_accuracy": c2st(samples, real, reference, seed, groups_b=cases)}
    if reference.regressor is not None:
        scores["sample_fd"] = _frechet(reference.regressor, samples, real)
        if positions.isfinite().any():
            scores["sample_position_mae"] = _position_mae(reference.regressor, samples,
                                                          positions)
    return scores


def sanity_scores(run: Run, reference: RealReference, train_grids: torch.Tensor, n: int,
                  seed: int) -> dict[str, float]:
    """The same scores where the answer is known: real against real (halves of the held-out
    subjects: c2st ≈ 0.5), and two kinds of fakes that a test with power must catch (≈ 1)."""
    recon = reference.reconstructions
    scores = real_vs_real(reference, seed)
    generator = torch.Generator().manual_seed(seed)
    unigram = to_uint8(run.decode(sample_scores.unigram_grids(train_grids, n, generator)))
    real, real_cases = _matched_real(reference, n, seed)
    scores["c2st_unigram"] = c2st(unigram, real, reference, seed, groups_b=real_cases)
    chimeras = _chimeras(run, reference, n, generator)
    if chimeras is not None:
        scores["c2st_chimera"] = c2st(chimeras, real, reference, seed, groups_b=real_cases)
    if reference.regressor is not None:
        regressor = reference.regressor
        scores["sample_fd_unigram"] = _frechet(regressor, unigram, real)
        if reference.positions.isfinite().any():
            scores["test_position_mae"] = _position_mae(regressor, recon, reference.positions)
    return scores


def real_vs_real(reference: RealReference, seed: int,
                 splits: int = REAL_VS_REAL_SPLITS,
                 per_side: int = REAL_VS_REAL_SLICES) -> dict[str, float]:
    """c2st (and, with a regressor, the Fréchet distance) between two halves of the held-out
    real slices (validation and test reconstructions), split by subject at random `splits`
    times, `per_side` slices a side: their means and sds over the splits."""
    images, cases = _held_out(reference)
    # every split draws from the same slices: their features once, not once per split
    feats = None if reference.regressor is None else \
        sample_scores.features(reference.regressor, images)
    accuracies, distances = [], []
    for split, (a, b) in enumerate(_subject_halves(cases, splits, per_side, seed)):
        accuracies.append(c2st(images[a], images[b], reference, seed + split, cases[a],
                               cases[b]))
        if feats is not None and len(a) > 1 and len(b) > 1:
            distances.append(sample_scores.frechet_distance(feats[a], feats[b]))
    scores = {"c2st_real_vs_real": float(np.mean(accuracies)),
              "c2st_real_vs_real_sd": float(np.std(accuracies))}
    if distances:
        scores.update(sample_fd_real_vs_real=float(np.mean(distances)),
                      sample_fd_real_vs_real_sd=float(np.std(distances)))
    return scores


def whole_slice_scores(run: Run, reference: RealReference, train: SliceSet, seed: int,
                       temperature: float = 1.0, top_p: float = 1.0,
                       train_grids: torch.Tensor | None = None) -> dict[str, float]:
    """The whole-slice test: a classifier on 128² slices and their left-right difference, on
    the frozen convolutions of a position regressor trained on them (`slice_encoder`), tells
    brains generated at every test slice's level from those slices' reconstructions; beside it
    real against real (random halves of the held-out subjects, as many slices a side: ≈ 0.5)
    and unigram slices and chimeras (≈ 1). Empty where no training slice has a position."""
    positions = relative_positions(train.names)
    known = positions.isfinite()
    if known.sum() < 2:
        return {}
    regressor = sample_scores.train_position_regressor(
        train.images[known].numpy(), positions[known].numpy(), seed=seed,
        encoder=sample_scores.slice_encoder)
    real, cases = reference.reconstructions, reference.cases
    n = len(real)
    grids = run.generate(reference.positions, temperature, seed, top_p)
    scores = {"slice_c2st": _slice_c2st(to_uint8(run.decode(grids)), real, regressor, seed,
                                        groups_b=cases)}
    held_out, held_out_cases = _held_out(reference)
    accuracies = [_slice_c2st(held_out[a], held_out[b], regressor, seed + split,
                              held_out_cases[a], held_out_cases[b])
                  for split, (a, b) in enumerate(
                      _subject_halves(held_out_cases, SLICE_TEST_SPLITS, n, seed))]
    scores.update(slice_c2st_real_vs_real=float(np.mean(accuracies)),
                  slice_c2st_real_vs_real_sd=float(np.std(accuracies)))
    generator = torch.Generator().manual_seed(seed)
    fakes = {"slice_c2st_chimera": _chimeras(run, reference, n, generator)}
    if train_grids is not None:
        fakes["slice_c2st_unigram"] = to_uint8(run.decode(
            sample_scores.unigram_grids(train_grids, n, generator)))
    for name, images in fakes.items():
        if images is not None:
            scores[name] = _slice_c2st(images, real, regressor, seed, groups_b=cases)
    return scores


def _chimeras(run: Run, reference: RealReference, n: int,
              generator: torch.Generator) -> np.ndarray | None:
    """n uint8 chimeras of the validation grids; None where their positions are unknown."""
    known = reference.other_positions.isfinite()
    if known.sum() < 2:
        return None
    grids = sample_scores.chimera_grids(reference.other_grids[known],
                                        reference.other_positions[known], n, generator)
    return to_uint8(run.decode(grids))


def _slice_c2st(a: np.ndarray, b: np.ndarray, regressor: sample_scores.SliceEncoder, seed: int,
                groups_a: np.ndarray | None = None,
                groups_b: np.ndarray | None = None) -> float:
    n = min(len(a), len(b))
    if n < 2:
        return float("nan")
    return sample_scores.c2st_accuracy(a, b, folds=min(C2ST_FOLDS, n), seed=seed,
                                       backbone=regressor, groups_a=groups_a, groups_b=groups_b)


def texture_scores(run: Run, reference: RealReference, samples: np.ndarray,
                   train_grids: torch.Tensor, seed: int) -> dict[str, float]:
    """The patch two-sample test (`sample_scores.c2st_patch_accuracy`) of uint8 generated
    slices against as many real test reconstructions, beside cases whose answer is known:
    real against real (random halves of the held-out subjects) and chimeras (every patch
    real) must score ≈ 0.5; blurred reconstructions and unigram slices must be caught."""
    n = len(samples)
    real, cases = _matched_real(reference, n, seed)  # as texture_c2st's
    generator = torch.Generator().manual_seed(seed)
    held_out, held_out_cases = _held_out(reference)
    a, b = _random_halves(held_out_cases, np.unique(held_out_cases), n, generator)
    blurred = to_uint8(ndimage.gaussian_filter(real / 255.0, (0, BLUR_SIGMA_PX, BLUR_SIGMA_PX)))
    unigram = to_uint8(run.decode(sample_scores.unigram_grids(train_grids, n, generator)))
    against_real = {"texture_c2st_blurred": (blurred, cases),
                    "texture_c2st_unigram": (unigram, None)}
    chimeras = _chimeras(run, reference, n, generator)
    if chimeras is not None:
        against_real["texture_c2st_chimera"] = (chimeras, None)
    scores = {"texture_c2st": texture_c2st(samples, reference, seed),
              "texture_c2st_real_vs_real": sample_scores.c2st_patch_accuracy(
                  held_out[a], held_out[b], folds=min(C2ST_FOLDS, n), seed=seed,
                  groups_a=held_out_cases[a], groups_b=held_out_cases[b])}
    for name, (fakes, groups) in against_real.items():
        scores[name] = sample_scores.c2st_patch_accuracy(
            fakes, real, folds=min(C2ST_FOLDS, n), seed=seed, groups_a=groups, groups_b=cases)
    return scores


def texture_c2st(samples: np.ndarray, reference: RealReference, seed: int) -> float:
    """The patch two-sample test of uint8 generated slices against as many real test
    reconstructions, each subject's in one fold."""
    real, cases = _matched_real(reference, len(samples), seed)
    return sample_scores.c2st_patch_accuracy(samples, real, folds=min(C2ST_FOLDS, len(samples)),
                                             seed=seed, groups_b=cases)


def _held_out(reference: RealReference) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out real slice (validation and test reconstructions) and its subject."""
    return (np.concatenate([reference.other, reference.reconstructions]),
            np.concatenate([reference.other_cases, reference.cases]))


def _subject_halves(cases: np.ndarray, splits: int, per_side: int,
                    seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`splits` random splits of the subjects of `cases` in two halves: the rows of each half,
    up to `per_side` a side, the same for a seed wherever they are drawn."""
    subjects = np.unique(cases)
    generator = torch.Generator().manual_seed(seed + 2)
    for _ in range(splits):
        yield _random_halves(cases, subjects, per_side, generator)


def _random_halves(cases: np.ndarray, subjects: np.ndarray, per_side: int,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two halves of `subjects` drawn at random, up to `per_side` slices a side."""
    half = np.isin(cases, subjects[torch.randperm(len(subjects), generator=generator)
                                   .numpy()[: len(subjects) // 2]])
    a, b = (_some(where, per_side, generator) for where in (half, ~half))
    return a, b


def _some(where: np.ndarray, n: int, generator: torch.Generator) -> np.ndarray:
    """Up to n of the positions where `where` holds, at random."""
    rows = np.flatnonzero(where)
    return rows[torch.randperm(len(rows), generator=generator).numpy()[:n]]


def _frechet(regressor: sample_scores.SliceEncoder, a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between slices `a` and `b` in the regressor's feature space."""
    return sample_scores.frechet_distance(sample_scores.features(regressor, a),
                                          sample_scores.features(regressor, b))


def _position_mae(regressor: sample_scores.SliceEncoder, images: np.ndarray,
                  positions: torch.Tensor) -> float:
    """Mean |predicted − true| relative position over the slices whose position is known."""
    known = positions.isfinite().numpy()
    predicted = sample_scores.predict_positions(regressor, images[known])
    return float(np.abs(predicted - positions[known].numpy()).mean())


def c2st(a: np.ndarray, b: np.ndarray, reference: RealReference, seed: int,
         groups_a: np.ndarray | None = None, groups_b: np.ndarray | None = None) -> float:
    """`sample_scores.c2st_accuracy` with up to 5 folds, real slices kept in folds by subject,
    on the reference's regressor as backbone; NaN with fewer than 2 slices a side."""
    n = min(len(a), len(b))
    if n < 2:
        return float("nan")
    return sample_scores.c2st_accuracy(a, b, folds=min(C2ST_FOLDS, n), seed=seed,
                                       backbone=reference.regressor, groups_a=groups_a,
                                       groups_b=groups_b)


def _matched_real(reference: RealReference, n: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n real reconstructions, drawn without replacement where there are enough, and their
    cases."""
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(reference.reconstructions), generator=generator)[:n].numpy()
    return reference.reconstructions[order], reference.cases[order]
