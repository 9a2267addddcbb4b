"""generation.py's wiring: which slices each sanity case is built from and compared with."""
import numpy as np
import pytest
import torch

from brainvq.evaluation import generation, sample_scores


class GridRun:
    """Stands in for inference.Run: "decodes" a (B, 8, 8) grid to a (B, 64, 64) image."""

    def decode(self, grids: torch.Tensor) -> np.ndarray:
        images = grids.float().repeat_interleave(8, 1).repeat_interleave(8, 2) / 16
        return images.numpy()


def _reference(rng: np.random.Generator) -> generation.RealReference:
    test_grids = torch.from_numpy(rng.integers(0, 8, (20, 8, 8)))
    other_grids = torch.from_numpy(rng.integers(8, 16, (20, 8, 8)))  # other codes: traceable
    run = GridRun()
    return generation.RealReference(
        reconstructions=generation.to_uint8(run.decode(test_grids)),
        cases=np.repeat(np.arange(4), 5).astype(str),
        other=generation.to_uint8(run.decode(other_grids)),
        other_cases=np.repeat(np.arange(4, 8), 5).astype(str), other_grids=other_grids,
        other_positions=torch.linspace(0, 1, 20), positions=torch.linspace(0, 1, 20),
        regressor=None)


def test_chimeras_come_from_other_subjects_than_the_real_side(monkeypatch):
    # Chimeras made of the real side's own slices let the classifier recognise those slices
    # (it scored below chance on them): their halves must come from the validation grids.
    reference = _reference(np.random.default_rng(0))
    seen = {}
    chimera_grids = sample_scores.chimera_grids

    def spy_chimeras(grids, positions, n, generator):
        seen["grids"] = grids
        return chimera_grids(grids, positions, n, generator)

    def spy_c2st(a, b, reference, seed, groups_a=None, groups_b=None):
        seen.setdefault("pairs", []).append((a, b))
        return 0.5

    monkeypatch.setattr(generation.sample_scores, "chimera_grids", spy_chimeras)
    monkeypatch.setattr(generation, "c2st", spy_c2st)
    train_grids = torch.from_numpy(np.random.default_rng(1).integers(0, 8, (20, 8, 8)))
    scores = generation.sanity_scores(GridRun(), reference, train_grids, 10, seed=0)
    assert set(scores) == {"c2st_real_vs_real", "c2st_real_vs_real_sd", "c2st_unigram",
                           "c2st_chimera"}
    assert torch.equal(seen["grids"], reference.other_grids)
    chimeras, real = seen["pairs"][-1]
    # validation codes (8..15) decode to ≥ 127, test codes (0..7) to ≤ 112
    assert chimeras.min() >= 127  # every site of every chimera from a validation grid
    assert real.max() <= 112  # the real side: test reconstructions only


def test_real_vs_real_splits_the_held_out_subjects_and_averages_the_splits(monkeypatch):
    # Each split: two halves of the eight held-out subjects (validation and test pooled), no
    # subject on both sides, at most `per_side` slices a side, the two-sample test and the
    # Fréchet distance on the same halves; the scores: means and sds over the splits.
    reference = _reference(np.random.default_rng(0))
    reference.regressor = object()  # stands in for the position regressor: both spied on
    distances = []

    def spy_features(regressor, images):  # each slice's "features": its own pixels
        return images.reshape(len(images), -1).astype(np.float64)

    def spy_frechet(feats_a, feats_b):
        distances.append((feats_a, feats_b))
        return float(len(distances))

    images = np.concatenate([reference.other, reference.reconstructions])
    cases = np.concatenate([reference.other_cases, reference.cases])
    calls = []

    def spy_c2st(a, b, reference, seed, groups_a=None, groups_b=None):
        calls.append((a, b, groups_a, groups_b))
        return [0.4, 0.6, 0.5][len(calls) % 3]

    monkeypatch.setattr(generation, "c2st", spy_c2st)
    monkeypatch.setattr(generation.sample_scores, "features", spy_features)
    monkeypatch.setattr(generation.sample_scores, "frechet_distance", spy_frechet)
    scores = generation.real_vs_real(reference, seed=0, splits=6, per_side=7)
    assert len(calls) == len(distances) == 6
    assert scores["c2st_real_vs_real"] == pytest.approx(0.5)
    assert scores["c2st_real_vs_real_sd"] == pytest.approx(np.std([0.6, 0.5, 0.4] * 2))
    assert scores["sample_fd_real_vs_real"] == pytest.approx(3.5)  # mean of 1..6
    assert scores["sample_fd_real_vs_real_sd"] == pytest.approx(np.std(np.arange(1, 7)))
    for (a, b, _, _), (fd_a, fd_b) in zip(calls, distances, strict=True):
        assert np.array_equal(spy_features(None, a), fd_a)
        assert np.array_equal(spy_features(None, b), fd_b)
    halves = set()
    for a, b, groups_a, groups_b in calls:
        assert len(a) == len(b) == 7 == len(groups_a) == len(groups_b)
        assert not set(groups_a) & set(groups_b)
        for side, groups in ((a, groups_a), (b, groups_b)):  # each slice keeps its subject
            for image, group in zip(side, groups, strict=True):
                assert any(np.array_equal(image, images[i])
                           for i in np.flatnonzero(cases == group))
        halves.add(frozenset(groups_a))
    assert len(halves) > 1  # the splits differ


def test_real_vs_real_of_one_subject_a_half_is_nan():
    # With two held-out subjects each half is one subject: no subject can be held out of a
    # side that still has one to learn from, so no fold can be scored.
    reference = _reference(np.random.default_rng(0))
    reference.other_cases = np.full(len(reference.other_cases), "v")
    reference.cases = np.full(len(reference.cases), "t")
    assert np.isnan(generation.real_vs_real(reference, seed=0, splits=2)["c2st_real_vs_real"])


def test_texture_scores_compare_each_case_with_the_same_real_slices(monkeypatch):
    reference = _reference(np.random.default_rng(0))
    calls = {}

    def spy(a, b, folds, seed, groups_a=None, groups_b=None):
        calls[len(calls)] = (a, b, groups_a, groups_b)
        return 0.5

    monkeypatch.setattr(generation.sample_scores, "c2st_patch_accuracy", spy)
    samples = generation.to_uint8(GridRun().decode(torch.full((6, 8, 8), 3)))
    train_grids = torch.from_numpy(np.random.default_rng(1).integers(0, 8, (10, 8, 8)))
    scores = generation.texture_scores(GridRun(), reference, samples, train_grids, seed=0)
    assert set(scores) == {"texture_c2st", "texture_c2st_real_vs_real", "texture_c2st_blurred",
                           "texture_c2st_unigram", "texture_c2st_chimera"}
    first, (rvr_a, rvr_b, groups_a, groups_b), *rest = calls.values()
    against_real = [first, *rest]
    assert len(rvr_a) == len(rvr_b) == 6 and not set(groups_a) & set(groups_b)
    real, real_cases = against_real[0][1], against_real[0][3]
    assert len(real) == 6 and all(np.array_equal(b, real) for _, b, _, _ in against_real)
    assert all(np.array_equal(groups, real_cases) for *_, groups in against_real)
    fakes = [a for a, *_ in against_real]
    assert any(np.array_equal(a, samples) for a in fakes)
    blurred = [(a, groups) for a, _, groups, _ in against_real
               if groups is not None and np.array_equal(groups, real_cases)]
    assert len(blurred) == 1  # the blurred real slices keep their subjects' folds
    assert not np.array_equal(blurred[0][0], real)
    assert np.abs(blurred[0][0].astype(float) - real).mean() < 20  # a blur, not other slices


class SamplingGridRun(GridRun):
    """A GridRun that also "samples": every grid it is asked to fill becomes all code 3, and
    it records the positions asked for."""

    def __init__(self) -> None:
        self.asked: list[torch.Tensor] = []

    def sample(self, indices, temperature, seed, positions=None, top_p=1.0):
        self.asked.append(positions)
        return torch.full_like(indices, 3)

    def generate(self, positions, temperature, seed, top_p=1.0):
        return self.sample(torch.full((len(positions), 8, 8), -1), temperature, seed, positions,
                           top_p)


def test_whole_slice_test_generates_at_every_test_level_and_scores_each_case(monkeypatch):
    reference = _reference(np.random.default_rng(0))
    train = generation.SliceSet(torch.zeros(6, 64, 64, dtype=torch.uint8),
                                [f"case_9_slice_{i}.nii.png" for i in range(6)])
    calls = {}

    def spy_regressor(images, positions, *, seed, encoder):
        calls["regressor"] = (len(images), encoder)
        return "regressor"

    def spy_c2st(a, b, *, folds, seed, backbone, groups_a=None, groups_b=None):
        calls.setdefault("pairs", []).append((a, b, backbone, groups_a, groups_b))
        return 0.5

    monkeypatch.setattr(generation.sample_scores, "train_position_regressor", spy_regressor)
    monkeypatch.setattr(generation.sample_scores, "c2st_accuracy", spy_c2st)
    run = SamplingGridRun()
    train_grids = torch.from_numpy(np.random.default_rng(1).integers(0, 8, (20, 8, 8)))
    scores = generation.whole_slice_scores(run, reference, train, seed=0,
                                           train_grids=train_grids)
    assert set(scores) == {"slice_c2st", "slice_c2st_real_vs_real", "slice_c2st_real_vs_real_sd",
                           "slice_c2st_chimera", "slice_c2st_unigram"}
    assert calls["regressor"] == (6, generation.sample_scores.slice_encoder)
    assert torch.equal(run.asked[0], reference.positions)  # one sample at every test level
    samples, real, backbone, _, groups = calls["pairs"][0]
    assert (samples == generation.to_uint8(GridRun().decode(torch.full((1, 8, 8), 3)))).all()
    assert np.array_equal(real, reference.reconstructions) and backbone == "regressor"
    assert np.array_equal(groups, reference.cases)
    splits = calls["pairs"][1: 1 + generation.SLICE_TEST_SPLITS]
    for a, b, _, groups_a, groups_b in splits:  # real vs real: halves of the held-out subjects
        assert len(a) == len(b) and not set(groups_a) & set(groups_b)
    chimeras, real = calls["pairs"][-2][:2]  # built from validation codes, scored against test
    assert chimeras.min() >= 127 and np.array_equal(real, reference.reconstructions)


def test_whole_slice_test_needs_known_training_positions():
    train = generation.SliceSet(torch.zeros(3, 64, 64, dtype=torch.uint8), ["a.png", "b.png",
                                                                           "c.png"])
    assert generation.whole_slice_scores(SamplingGridRun(), _reference(np.random.default_rng(0)),
                                         train, seed=0) == {}
