"""sample_scores: the two-sample test sees where things are, the baselines are built as
claimed, the Fréchet distance matches its closed form and the position regressor learns.

Small 64×64 synthetic slices keep the file to seconds. Accuracies are compared with margins of
several binomial standard deviations, never exactly, so they hold on every kernel set."""
import warnings

import numpy as np
import pytest
import torch

from brainvq.evaluation import sample_scores
from brainvq.evaluation.sample_scores import (
    brain_patches,
    c2st_accuracy,
    c2st_patch_accuracy,
    chimera_grids,
    features,
    frechet_distance,
    group_folds,
    inside_corners,
    predict_positions,
    train_position_regressor,
    unigram_grids,
)

SIZE = 64


def blob_slices(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 64, 64): a bright disc centred at each row (jittered sideways) on noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cols = SIZE / 2 + rng.uniform(-6, 6, len(rows))
    inside = (yy - rows[:, None, None]) ** 2 + (xx - cols[:, None, None]) ** 2 < 8**2
    images = 40 + 160 * inside + rng.normal(0, 20, inside.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def test_c2st_is_chance_on_one_distribution_and_high_on_two():
    rng = np.random.default_rng(0)
    centred = lambda n: blob_slices(rng.uniform(26, 38, n), rng)  # noqa: E731
    same = c2st_accuracy(centred(40), centred(40), epochs=10, seed=0)
    # 80 held-out answers: chance gives 0.5 ± 0.056 (one s.d.); 0.2 is over 3.5 s.d.
    assert abs(same - 0.5) < 0.2
    top, bottom = blob_slices(rng.uniform(14, 24, 40), rng), blob_slices(
        rng.uniform(40, 50, 40), rng)
    assert c2st_accuracy(top, bottom, epochs=10, seed=0) >= 0.9


def test_c2st_is_seeded_balanced_and_leaves_torch_state_alone():
    rng = np.random.default_rng(1)
    a = blob_slices(rng.uniform(14, 24, 30), rng)
    b = blob_slices(rng.uniform(40, 50, 12), rng).astype(np.float32) / 255  # floats in [0, 1]
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    first = c2st_accuracy(a, b, epochs=3, folds=3, seed=4)
    assert first == c2st_accuracy(a, b, epochs=3, folds=3, seed=4)
    assert first * 24 == round(first * 24)  # 12 per side were used: 24 held-out answers
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="at least 5"):
        c2st_accuracy(a, b[:4])


def test_unigram_grids_draw_each_site_from_its_own_marginal():
    # site (r, c) holds code r·8 + c in some grids and r·8 + c + 100 in the others
    n_real, h, w = 40, 4, 8
    base = torch.arange(h * w).view(1, h, w)
    high = torch.rand(n_real, generator=torch.Generator().manual_seed(1)) < 0.25  # per grid
    grids = base + 100 * high.view(-1, 1, 1).long()
    sampled = unigram_grids(grids, 4000, torch.Generator().manual_seed(0))
    assert sampled.shape == (4000, h, w) and sampled.dtype == torch.int64
    assert ((sampled == base) | (sampled == base + 100)).all()
    share_high = (sampled >= 100).double().mean(0)
    # each site's frequency, 4000 draws: s.d. ≤ 0.008, so 0.04 is five of them
    assert torch.allclose(share_high, high.double().mean().expand(h, w), atol=0.04)
    # sites are independent, so almost every grid mixes high and low codes; no real grid does
    mixed = (sampled >= 100).any(dim=(1, 2)) & (sampled < 100).any(dim=(1, 2))
    assert mixed.float().mean() > 0.9


def test_chimera_grids_join_halves_of_two_distant_levels():
    n_real = 12
    grids = torch.arange(n_real).view(-1, 1, 1).expand(n_real, 8, 8)  # grid i is all i
    positions = np.linspace(0, 1, n_real)
    chimeras = chimera_grids(grids, positions, 200, torch.Generator().manual_seed(0))
    assert chimeras.shape == (200, 8, 8)
    top, bottom = chimeras[:, :4], chimeras[:, 4:]
    assert (top == top[:, :1, :1]).all() and (bottom == bottom[:, :1, :1]).all()
    gaps = np.abs(positions[top[:, 0, 0]] - positions[bottom[:, 0, 0]])
    assert gaps.min() >= 0.3
    assert len(set(top[:, 0, 0].tolist())) == n_real  # every level can be a top
    with pytest.raises(ValueError, match="apart"):
        chimera_grids(grids, np.full(n_real, 0.5), 4, torch.Generator())


def test_frechet_distance_is_zero_on_itself_symmetric_and_matches_a_mean_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    scale = np.trace(np.cov(a, rowvar=False))
    # sqrtm of Σ·Σ returns Σ up to rounding: relative 1e-6 is far above float64's
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6 * scale)
    b = rng.normal(size=(200, 6)) * 2
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    shift = np.array([3.0, 0, -1, 0, 0, 2])
    # equal covariances: the trace terms cancel and ‖μa − μb‖² is left
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6,
                                                           abs=1e-6 * scale)
    assert frechet_distance(a, a + 2 * shift) > frechet_distance(a, a + shift)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5000, 3)), rng.normal(size=(5000, 3)) * [1, 2, 3] + 1
    mean_a, mean_b = a.mean(0), b.mean(0)
    sd_a, sd_b = a.std(0, ddof=1), b.std(0, ddof=1)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    # the samples' small off-diagonal covariances move the exact value by well under 2%
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(5, 16))  # 5 samples in 16 dimensions: rank 4
    dead = np.c_[rng.normal(size=(50, 3)), np.zeros((50, 2))]  # two dead units
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's singular-matrix warning is handled, not shown
        distance = frechet_distance(few, rng.normal(size=(5, 16)))
        shifted = frechet_distance(dead, dead + 1)
    assert np.isfinite(distance) and distance > 0
    # the eps offset on the diagonals moves the exact 5 by about 2·eps per dimension
    assert shifted == pytest.approx(5, abs=1e-4)


def test_position_regressor_learns_a_synthetic_position_signal():
    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 1, 240)
    images = blob_slices(12 + 40 * positions, rng)  # the blob's row encodes the position
    model = train_position_regressor(images[:200], positions[:200], epochs=12, seed=0)
    predicted = predict_positions(model, images[200:])
    assert predicted.shape == (40,)
    # chance (predicting the mean) scores about 0.25; 0.08 is a blob row off by ~3 pixels
    assert np.abs(predicted - positions[200:]).mean() < 0.08
    feats = features(model, images[200:])
    assert feats.shape == (40, 64) and np.isfinite(feats).all()


def test_c2st_keeps_near_duplicate_groups_in_one_fold():
    # 10 "subjects", each a blob at its own place, 8 near-identical slices each; the two sides
    # take alternate slices of the same subjects, so they come from one distribution. Folds
    # that split a subject's slices let the classifier recognise its neighbours instead.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    slices, subjects = [], []
    for subject in range(10):
        cy, cx = rng.uniform(16, 48, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60)
        for _ in range(8):
            slices.append(blob + 0.02 * rng.standard_normal(blob.shape))
            subjects.append(subject)
    slices, subjects = np.clip(np.stack(slices), 0, 1), np.array(subjects)
    a, b = slices[0::2], slices[1::2]
    grouped = c2st_accuracy(a, b, seed=0, epochs=15, groups_a=subjects[0::2],
                            groups_b=subjects[1::2])
    assert abs(grouped - 0.5) <= 0.2


@pytest.mark.parametrize("seed", range(6))
def test_group_folds_hold_out_as_many_groups_of_each_side(seed):
    # Five subjects a side, five folds: every fold must hold out one subject of each side.
    # Dealt as one pool, some fold would get two of one side and none of the other, and a
    # classifier that learnt nothing would score far below chance there.
    sides = [np.array([f"val{i}" for i in range(5)]).repeat(3),
             np.array([f"test{i}" for i in range(5)]).repeat(3)]
    fold_of = group_folds(sides, 5, torch.Generator().manual_seed(seed))
    for side in sides:
        assert sorted(fold_of[name] for name in np.unique(side)) == list(range(5))


def test_group_folds_keep_a_group_on_both_sides_in_one_fold():
    fold_of = group_folds([np.array(["a", "b", "c"]), np.array(["c", "d", "e"])], 3,
                          torch.Generator().manual_seed(0))
    assert set(fold_of) == {"a", "b", "c", "d", "e"}
    assert sorted(fold_of[name] for name in "abc") == [0, 1, 2]


def two_disc_slices(top_levels: np.ndarray, bottom_levels: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 64, 64): in each half a disc whose column encodes that half's level."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = np.zeros((len(top_levels), SIZE, SIZE), bool)
    for row, levels in ((16, top_levels), (48, bottom_levels)):
        cols = 12 + 40 * levels
        inside |= (yy - row) ** 2 + (xx - cols[:, None, None]) ** 2 < 6**2
    images = 40 + 160 * inside + rng.normal(0, 20, inside.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def test_c2st_on_a_frozen_backbone_sees_mismatched_halves_and_leaves_it_alone():
    # slices whose two halves show one level, and "chimeras" whose halves show two levels
    # ≥ 0.4 apart: each half looks real, only their pairing is wrong
    rng = np.random.default_rng(0)
    levels = rng.uniform(0, 1, 200)
    backbone = train_position_regressor(two_disc_slices(levels, levels, rng), levels, epochs=12)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    real = lambda n: two_disc_slices(*(2 * [rng.uniform(0, 1, n)]), rng)  # noqa: E731
    test = rng.uniform(0, 1, 48)
    chimeras = two_disc_slices(test, (test + rng.uniform(0.4, 0.6, 48)) % 1, rng)
    assert c2st_accuracy(chimeras, real(48), backbone=backbone, seed=0) >= 0.8
    # 96 held-out answers: chance gives 0.5 ± 0.051 (one s.d.); 0.2 is ~4 s.d.
    assert abs(c2st_accuracy(real(48), real(48), backbone=backbone, seed=0) - 0.5) < 0.2
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def ring_brain(size: int = 64, level: int = 100) -> np.ndarray:
    """uint8 (size, size): a disc of tissue of radius 24 with a dark ventricle (radius 5) at its
    centre, on a black background."""
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    return np.where((r2 < 24**2) & (r2 >= 5**2), level, 0).astype(np.uint8)


def test_patches_lie_wholly_inside_the_brain_with_its_ventricles():
    image = ring_brain()
    filled = ring_brain() > 0
    filled[27:37, 27:37] |= True  # the ventricle counts as brain
    corners = inside_corners(image, 16)
    assert len(corners)
    for y, x in corners:
        assert filled[y: y + 16, x: x + 16].all()
    # the window over the ventricle is one of them; none sticks out of the disc
    assert any((y <= 24 and x <= 24 and y + 16 >= 40 and x + 16 >= 40) for y, x in corners)
    assert len(inside_corners(np.zeros((64, 64), np.uint8), 16)) == 0


def test_brain_patches_take_per_slice_patches_from_each_slice_with_room():
    images = np.stack([ring_brain(level=100), np.zeros((64, 64), np.uint8),
                       ring_brain(level=200)])
    patches, owner = brain_patches(images, np.random.default_rng(0), size=16, per_slice=5)
    assert patches.shape == (10, 16, 16) and owner.tolist() == [0] * 5 + [2] * 5
    assert set(np.unique(patches[:5])) <= {0, 100} and set(np.unique(patches[5:])) <= {0, 200}
    empty, none = brain_patches(images[1:2], np.random.default_rng(0), size=16)
    assert empty.shape == (0, 16, 16) and len(none) == 0


def textured(n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 64, 64) ring brains whose tissue carries pixel noise of sd `noise`."""
    tissue = ring_brain() > 0
    images = np.where(tissue, 120 + rng.normal(0, noise, (n, 64, 64)), 0)
    return np.clip(images, 0, 255).astype(np.uint8)


def test_patch_c2st_tells_textures_apart_and_not_one_texture_from_itself():
    rng = np.random.default_rng(0)
    kwargs = dict(size=16, per_slice=6)  # the default epochs and learning rate
    smooth, rough = textured(20, 2, rng), textured(20, 25, rng)
    assert c2st_patch_accuracy(smooth, rough, seed=0, **kwargs) > 0.9
    alike = c2st_patch_accuracy(textured(20, 10, rng), textured(20, 10, rng), seed=0, **kwargs)
    assert 0.25 < alike < 0.75  # 240 patches a side: chance ± 4 sd and more


def test_patch_c2st_keeps_each_slices_patches_and_each_group_in_one_fold(monkeypatch):
    seen = {}

    def spy(x, labels, fold, folds, make_model, epochs, batch_size, lr):
        seen.update(labels=labels, fold=fold)
        return 0.5

    monkeypatch.setattr(sample_scores, "held_out_accuracy", spy)
    rng = np.random.default_rng(0)
    a, b = textured(6, 5, rng), textured(10, 5, rng)
    groups_b = np.repeat(["s", "t", "u", "v", "w"], 2)
    c2st_patch_accuracy(a, b, seed=0, groups_b=groups_b, size=16, per_slice=3)
    fold, labels = seen["fold"], seen["labels"]
    assert labels.tolist() == [0.0] * 18 + [1.0] * 30
    for start in range(0, 18, 3):  # a slice of a: its three patches share a fold
        assert len(set(fold[start: start + 3].tolist())) == 1
    for start in range(18, 48, 6):  # a group of b (two slices): its six patches share one
        assert len(set(fold[start: start + 6].tolist())) == 1
    assert len(set(fold[:18].tolist())) == len(set(fold[18:].tolist())) == 5


def test_the_whole_slice_encoder_sees_each_slice_beside_its_left_right_difference():
    encoder = sample_scores.slice_encoder()
    symmetric = np.zeros((2, 256, 256), np.uint8)
    symmetric[:, 64:192, 64:192] = 200
    lopsided = symmetric.copy()
    lopsided[:, 100:140, 70:110] = 40  # a dark spot in one hemisphere only
    x = encoder.prepare(np.concatenate([symmetric, lopsided]))
    assert x.shape == (4, 2, sample_scores.SLICE_SIZE, sample_scores.SLICE_SIZE)
    assert torch.equal(x[:, 1], x[:, 0] - x[:, 0].flip(-1))
    assert x[:2, 1].abs().max() == 0 and x[2:, 1].abs().max() > 0.5
    assert encoder.eval()(x).shape == (4,)
    assert encoder.features(x).shape == (4, sample_scores.FEATURES)


def test_fit_takes_the_same_steps_as_the_per_tensor_adam_loop(monkeypatch):
    """fit's multi-tensor Adam step changes no score, only the time."""
    x = torch.randn(24, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.rand(24, generator=torch.Generator().manual_seed(1))

    def weights(epochs: int) -> list[torch.Tensor]:
        with sample_scores.seeded_torch(0, 1):
            model = sample_scores.SliceEncoder(16, features=8, widths=(4, 8))
            if epochs:
                model = sample_scores.fit(model, x, target, torch.nn.functional.l1_loss,
                                          epochs=epochs, batch_size=8, lr=1e-2)
        return [p.detach().clone() for p in model.parameters()]

    ours, untrained = weights(2), weights(0)
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam",
                        lambda params, **kw: adam(params, **{**kw, "foreach": False}))
    reference = weights(2)
    assert not all(torch.equal(a, b) for a, b in zip(ours, untrained, strict=True))
    for a, b in zip(ours, reference, strict=True):
        assert torch.equal(a, b)
