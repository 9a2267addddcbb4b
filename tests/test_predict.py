"""Full-context inpainting, surprise, lesions and the evaluation helpers, on tiny random
models and synthetic images; the lesion check on the real demo run when there is one."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from brainvq.data.slices import evenly_spaced
from brainvq.evaluation import anomaly, run_metrics
from brainvq.inference import masks
from brainvq.inference import trained_run as inference
from brainvq.inference.sampling import sample, sample_particles
from brainvq.io_utils import RunError
from priors import random_prior

REPO = Path(__file__).resolve().parent.parent
DEMO_RUN = REPO / "runs" / "demo"


@pytest.fixture(scope="module")
def prior():
    return random_prior(sharpness=20, n_codes=6, channels=8, grid_size=8)


def _grids(n=3, size=8, seed=0):
    return torch.randint(0, 6, (n, size, size), generator=torch.Generator().manual_seed(seed))


def test_full_context_inpainting_keeps_every_given_index(prior):
    grids = _grids()
    masked = grids.clone()
    masked[0, 2:5, 2:5] = -1
    masked[1, 3:6, 1:7] = -1
    masked[2, 0, 0] = -1
    fills = inference.inpaint_full_context(prior, masked, candidates=4, sweeps=2,
                                           generator=torch.Generator().manual_seed(1),
                                           proposals=3)
    given = masked != -1
    for filled in (fills.raster, fills.likeliest_above, fills.full):
        assert torch.equal(filled[given], grids[given])
        assert ((filled >= 0) & (filled < 6)).all()


def test_full_context_keeps_the_particle_whose_whole_grid_is_likeliest(prior):
    """The baselines come from the raster fills the generator draws first for the repeated
    grids (`raster` the first, `likeliest_above` the one with the fewest bits in the hole);
    `full` is, of the particles it draws next, the one with the fewest bits over the grid."""
    b, n = 8, 8
    masked = masks.apply_mask(_grids(n=b), masks.centre_square_mask(8, 4))
    fills = inference.inpaint_full_context(prior, masked, candidates=n,
                                           generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    pool = sample(prior, masked.repeat_interleave(n, 0), generator=generator)
    particles = sample_particles(prior, masked, n, generator=generator)
    rows, hole = torch.arange(b), (masked == -1)[:, None]

    def site_bits(grids):
        return inference.surprise_bits(prior, grids).view(b, n, 8, 8)

    pool, whole = pool.view(b, n, 8, 8), site_bits(particles).sum((2, 3))
    assert torch.equal(fills.raster, pool[:, 0]) and torch.equal(fills.candidates, pool)
    assert torch.equal(fills.likeliest_above,
                       pool[rows, (site_bits(pool.flatten(0, 1)) * hole).sum((2, 3)).argmin(1)])
    assert torch.equal(fills.full, particles.view(b, n, 8, 8)[rows, whole.argmin(1)])
    assert not torch.equal(fills.full, fills.likeliest_above)  # the later context counts


def test_given_after_holes_marks_the_context_raster_order_never_sees():
    holes = torch.zeros(2, 3, 3, dtype=torch.bool)
    holes[0, 1, 1] = True  # given sites after it: (1, 2) and row 2
    holes[1, 2] = True  # the last row: nothing given follows
    after = masks.given_after_holes(holes)
    expected = torch.zeros(2, 3, 3, dtype=torch.bool)
    expected[0, 1, 2] = expected[0, 2] = True
    assert torch.equal(after, expected)


def test_gibbs_sweeps_change_the_fill_and_are_reproducible(prior):
    masked = masks.apply_mask(_grids(n=4), masks.centre_square_mask(8, 4))

    def fill(sweeps):
        return inference.inpaint_full_context(prior, masked, 2, sweeps,
                                              torch.Generator().manual_seed(3), proposals=4).full
    assert not torch.equal(fill(0), fill(2))
    assert torch.equal(fill(2), fill(2))


def test_full_context_is_the_raster_sample_when_no_given_index_follows_the_hole(prior):
    masked = masks.apply_mask(_grids(), masks.bottom_half_mask(8))
    fills = inference.inpaint_full_context(prior, masked, 4, 2, torch.Generator().manual_seed(5))
    pool = sample(prior, masked.repeat_interleave(4, 0),
                  generator=torch.Generator().manual_seed(5)).view(3, 4, 8, 8)
    assert torch.equal(fills.candidates, pool)
    for filled in (fills.raster, fills.likeliest_above, fills.full):
        assert torch.equal(filled, pool[:, 0])


def _log_likelihood(prior, grid):
    return -inference.surprise_bits(prior, grid).sum().item() * math.log(2)


def test_a_hole_site_is_drawn_from_its_conditional_on_the_whole_grid():
    """One hole with given sites after it: the raster sampler draws it from p(site | earlier),
    the Gibbs updates from p(site | everything else), which is checked by enumeration. (A
    sharper prior than the other tests': at random weights the later sites must matter.)"""
    prior = random_prior(sharpness=40, n_codes=6, channels=8, grid_size=8)
    grid = _grids(n=1)
    r, c = 4, 2
    trials = grid.repeat(6, 1, 1)
    trials[:, r, c] = torch.arange(6)
    exact = torch.softmax(torch.tensor([_log_likelihood(prior, t[None]) for t in trials],
                                       dtype=torch.float64), 0)
    with torch.no_grad():
        own = torch.softmax(prior(grid)[0, :, r, c].double(), 0)
    assert (exact - own).abs().max() > 0.2  # the later sites matter here
    masked = grid.repeat(3000, 1, 1)
    masked[:, r, c] = -1
    # six sweeps: from the raster fill's start (its p(code 1) is 0.17 against 0.42 here) none
    # leaves the frequencies 0.28 off, one 0.12, two 0.04
    filled = inference.inpaint_full_context(prior, masked, candidates=1, sweeps=6,
                                            generator=torch.Generator().manual_seed(0),
                                            proposals=3).full
    frequencies = torch.bincount(filled[:, r, c], minlength=6).double() / len(filled)
    assert torch.allclose(frequencies, exact, atol=0.03)


def test_later_log_likelihood_is_the_whole_grid_less_the_site_and_earlier(prior):
    grid = _grids(n=1)
    r, c = 3, 4
    with torch.no_grad():
        own = torch.log_softmax(prior(grid)[0, :, r, c].double(), 0)
        rest = []
        for code in range(6):
            trial = grid.clone()
            trial[0, r, c] = code
            later = inference.later_log_likelihood(prior(trial), trial, r, c).item()
            rest.append(_log_likelihood(prior, trial) - own[code].item() - later)
    assert max(rest) - min(rest) < 1e-4  # the same earlier-sites term for every code


def test_gibbs_site_returns_the_new_grids_logits(prior):
    grids = _grids(n=3)
    with torch.no_grad():
        codes, logits = inference._gibbs_site(prior, grids, prior(grids), 2, 5, 3, 1.0,
                                            torch.Generator().manual_seed(0))
        grids[:, 2, 5] = codes
        assert torch.allclose(logits, prior(grids), atol=1e-5)


def test_surprise_bits_average_to_the_training_loss(prior):
    grids = _grids()
    bits = inference.surprise_bits(prior, grids)
    assert bits.shape == grids.shape and (bits >= 0).all()
    assert math.isclose(bits.mean().item(), prior.bits_per_index(grids).item(), rel_tol=1e-5)


def test_masks_and_their_pixels():
    centre = masks.centre_square_mask()
    assert centre.sum() == 144 and centre[10:22, 10:22].all()
    pixels = masks.sites_to_pixels(centre, 256)
    assert pixels.shape == (256, 256) and pixels.sum() == 144 * 64
    assert np.array_equal(masks.pixels_to_sites(pixels, 32), centre.numpy())


def _brain(size=256, value=120):
    yy, xx = np.ogrid[:size, :size]
    image = np.zeros((size, size), np.uint8)
    image[(yy - size / 2) ** 2 / 90 ** 2 + (xx - size / 2) ** 2 / 70 ** 2 <= 1] = value
    image[100:110, 100:110] = 230  # the brightest tissue sets the lesion's intensity
    return image


def test_lesion_is_a_bright_disc_inside_the_brain():
    image = _brain()
    lesioned, mask = anomaly.paste_lesion(image, np.random.default_rng(0))
    assert abs(mask.sum() - math.pi * anomaly.LESION_RADIUS_PX ** 2) < 30
    assert (image[mask] > 0).all()  # inside the brain
    assert lesioned[mask].mean() > 200 and lesioned.max() <= 230
    cy, cx = np.argwhere(mask).mean(0)
    yy, xx = np.ogrid[:256, :256]
    far = np.hypot(yy - cy, xx - cx) > 2.5 * anomaly.LESION_RADIUS_PX
    assert np.array_equal(lesioned[far], image[far])


class _PatchRun:
    """A stand-in run on an 8×8 grid of 32-px patches: code k decodes to a patch of intensity
    k / 10, and the prior fills every hole with a code in 0..3 (normal tissue)."""

    def decode(self, indices):
        return (indices.double() / 10).repeat_interleave(32, 1).repeat_interleave(32, 2).numpy()

    def sample(self, indices, temperature, seed, positions):
        codes = torch.randint(0, 4, indices.shape, generator=torch.Generator().manual_seed(seed))
        return torch.where(indices == -1, codes, indices)


def test_healed_maps_mark_what_is_brighter_than_every_healing_where_surprise_clusters():
    """A lesion site (code 9: brighter than any code the prior heals with) inside a cluster of
    surprising sites is marked; a lone surprising site is not resampled, and no map value
    falls outside the resampled sites."""
    grid = torch.full((1, 8, 8), 2)
    grid[0, 4, 4] = 9
    bits = np.ones((1, 8, 8))
    bits[0, 3:6, 3:6] = 10  # the lesion's neighbourhood
    bits[0, 0, 7] = 30  # one surprising site alone: smoothed, 30 / 9 + 8 / 9 < 5
    brain = np.ones((1, 256, 256), bool)
    study = anomaly.LesionStudy(
        clean=None, lesioned=_PatchRun().decode(grid), clean_bits=None, lesion_bits=bits,
        lesion_pixels=None, lesion_sites=None, brain_sites=None, brain_pixels=brain,
        lesion_indices=grid, positions=None)
    maps = anomaly.healed_maps(_PatchRun(), study, threshold=5.0, seed=0)
    lesion = np.zeros((256, 256), bool)
    lesion[128:160, 128:160] = True
    assert (maps[0][lesion[None][0]] >= 0.5).mean() > 0.9  # 0.9 − at most 0.3
    assert (maps[0][~lesion] == 0).all()


def test_surprise_at_lesion_pixels_weights_each_site_by_the_share_the_lesion_covers():
    """A 4×4-site grid of 2-px patches: the lesion fills site (1, 1) and a quarter of (1, 2).
    By touched sites the barely covered one counts in full; by pixels it counts a quarter."""
    pixels = np.zeros((1, 8, 8), bool)
    pixels[0, 2:4, 2:4] = True  # all of site (1, 1)
    pixels[0, 2, 4] = True  # one of the four pixels of site (1, 2)
    clean_bits = np.full((1, 4, 4), 2.0)
    lesion_bits = clean_bits.copy()
    lesion_bits[0, 1, 1], lesion_bits[0, 1, 2] = 12.0, 2.0
    sites = masks.pixels_to_sites(pixels[0], 4)[None]
    study = anomaly.LesionStudy(
        clean=np.zeros((1, 8, 8)), lesioned=None, clean_bits=clean_bits, lesion_bits=lesion_bits,
        lesion_pixels=pixels, lesion_sites=sites, brain_sites=~sites, brain_pixels=None,
        lesion_indices=None, positions=None)
    scores = anomaly.surprise_metrics(study)
    assert math.isclose(scores["surprise_lesion_bits"], 7.0)  # (12 + 2) / 2 sites
    assert math.isclose(scores["surprise_lesion_pixels_bits"], (4 * 12 + 2) / 5)
    assert math.isclose(scores["surprise_lesion_pixels_clean_bits"], 2.0)
    assert math.isclose(scores["surprise_lesion_core_bits"], 12.0)


def test_per_slice_position_groups_names_by_slice_index():
    names = ["case_001_slice_2.nii.png", "case_002_slice_2.nii.png",
             "case_001_slice_10.nii.png", "other.png"]
    rows = [{"ssim": s, "psnr": 10.0 * s} for s in (0.2, 0.4, 0.9, 0.0)]
    by_slice = run_metrics.per_slice_position(names, rows)
    assert list(by_slice) == ["2", "10"]
    assert math.isclose(by_slice["2"]["ssim"], 0.3) and by_slice["2"]["n_images"] == 2
    assert by_slice["10"] == {"ssim": 0.9, "psnr": 9.0, "n_images": 1}
    assert run_metrics.per_slice_position(["a.png"], rows[:1]) == {}


def test_nearest_neighbour_finds_the_copy_and_diversity_of_copies_is_zero():
    rng = np.random.default_rng(0)
    references = np.stack([_brain(value=v) for v in range(40, 240, 10)])
    references = np.clip(references + rng.integers(0, 30, references.shape), 0, 255).astype(
        np.uint8)
    queries = references[[3, 11]]
    best, index = run_metrics.nearest_neighbour_ssim(queries, references, n_candidates=4)
    assert index.tolist() == [3, 11] and np.allclose(best, 1.0)
    assert math.isclose(run_metrics.mean_pairwise_ssim(np.stack([queries[0]] * 3)), 1.0)
    assert run_metrics.mean_pairwise_ssim(queries) < 1


@pytest.mark.skipif(not (DEMO_RUN / "prior_best.pt").is_file(), reason="no trained demo run")
def test_demo_prior_is_surprised_by_a_lesion():
    import dataset
    run = inference.Run(DEMO_RUN, torch.device("cpu"))
    root = run.data_root if run.data_root.is_absolute() else REPO / run.data_root
    if not root.is_dir():
        pytest.skip(f"demo data {root} not built")
    test = dataset.load_split(dataset.find_split_dirs(root)["test"])
    study = anomaly.lesion_study(run, test.images[evenly_spaced(len(test), 8)], 0)
    scores = anomaly.surprise_metrics(study)
    assert scores["surprise_lesion_bits"] > scores["surprise_brain_bits"]


def test_user_masks_are_checked(tmp_path):
    ok = tmp_path / "ok.npy"
    grid = np.zeros((32, 32), np.int64)
    grid[4:8, 4:8] = 1
    np.save(ok, grid)
    assert masks.load_mask(ok, 16).sum() == 16
    index_grid = np.full((32, 32), 3)
    index_grid[0, :2] = -1
    np.save(tmp_path / "grid.npy", index_grid)
    assert masks.load_mask(tmp_path / "grid.npy", 16).sum() == 2
    for name, array, words in [
        ("shape.npy", np.ones((30, 30)), "must be 32×32"),
        ("values.npy", np.where(grid == 1, -1, 99), "holds 99"),
        ("negative.npy", np.full((32, 32), -2), "holds -2"),
        ("empty.npy", np.zeros((32, 32)), "marks nothing"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(RunError, match=words):
            masks.load_mask(tmp_path / name, 16)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(RunError, match="cannot be read"):
        masks.load_mask(tmp_path / "junk.npy", 16)
    with pytest.raises(RunError, match="not found"):
        masks.load_mask(tmp_path / "missing.png", 16)


def test_brain_codebook_stats_count_only_the_sites_that_are_mostly_brain():
    images = np.zeros((2, 64, 64), np.float32)
    images[0, :, :32] = 0.5  # left half of the first slice is brain; the second is all black
    indices = torch.full((2, 8, 8), 7, dtype=torch.long)  # background code
    indices[0, :, :4] = torch.arange(32).view(8, 4) % 4  # four codes, equally often
    stats = run_metrics.brain_codebook_stats(images, indices, n_codes=16)
    assert stats["codes_used_brain"] == 4
    assert math.isclose(stats["codebook_perplexity_brain"], 4.0, rel_tol=1e-9)


def test_average_precision_is_one_for_a_perfect_map_and_the_prevalence_for_noise():
    rng = np.random.default_rng(0)
    labels = rng.random((4, 64, 64)) < 0.05
    assert anomaly.average_precision(labels.astype(float) + 0.1 * rng.random(labels.shape),
                                     labels) == 1.0
    noise = anomaly.average_precision(rng.random(labels.shape), labels)
    assert abs(noise - labels.mean()) < 0.02
    assert anomaly.average_precision(-labels.astype(float), labels) < noise


def test_dice_and_the_level_that_maximises_it():
    labels = np.zeros((1, 10, 10), bool)
    labels[0, :5] = True
    assert anomaly.dice(labels, labels) == 1.0 and anomaly.dice(~labels, labels) == 0.0
    maps = np.where(labels, 2.0, 1.0)
    assert anomaly.dice(maps > anomaly.best_dice_level(maps, labels), labels) == 1.0


def _distinct_metrics() -> dict:
    """Every key the summary reads, each with its own value (0.101, 0.102, ...)."""
    keys = ["n_test_images", "test_ssim", "test_ssim_brain", "test_psnr", "test_psnr_brain",
            "codes_used", "codebook_perplexity", "codebook_perplexity_brain",
            "prior_test_bits_per_index", "prior_test_bits_brain", "n_eval_samples",
            "c2st_accuracy", "c2st_real_vs_real", "c2st_real_vs_real_sd", "c2st_unigram",
            "c2st_chimera", "sample_fd", "sample_fd_real_vs_real", "sample_fd_real_vs_real_sd",
            "sample_fd_unigram", "slice_c2st", "slice_c2st_real_vs_real",
            "slice_c2st_real_vs_real_sd", "slice_c2st_unigram", "slice_c2st_chimera",
            "sample_position_mae", "test_position_mae", "sample_nn_ssim",
            "test_nn_ssim", "inpaint_n_images", "lesion_auprc", "lesion_auprc_random_map",
            "lesion_auprc_true_difference", "lesion_dice"]
    keys += [f"inpaint_{mask}_{method}_ssim" for mask in ("bottom_half", "centre_square")
             for method in ("raster", "full", "mean", "reconstruction")]
    return {key: round(0.101 + i / 1000, 3) for i, key in enumerate(keys)}


def test_evaluate_summary_groups_the_scores_as_a_reader_reads_them():
    metrics = _distinct_metrics()
    lines = run_metrics.summary(metrics, Path("runs/x/metrics.json"))
    assert len(lines) <= 15
    heads = ["Reconstruction", "Codebook", "Prior", "Generated brains", "Inpainting",
             "Synthetic lesions", "All"]
    starts = [next(i for i, line in enumerate(lines) if line.startswith(h)) for h in heads]
    assert starts == sorted(starts)
    assert lines[-1] == f"All {len(metrics)} numbers: runs/x/metrics.json"

    def line_with(text: str) -> str:
        return next(line for line in lines if text in line)

    # each realism score beside its sanity values, in the order: score, real vs real, fakes
    two_sample = line_with("two-sample test")
    values = [f"{metrics[k]:.3f}" for k in ("c2st_accuracy", "c2st_real_vs_real",
                                            "c2st_real_vs_real_sd", "c2st_unigram",
                                            "c2st_chimera")]
    assert [two_sample.index(v) for v in values] == sorted(two_sample.index(v) for v in values)
    assert f"{metrics['sample_fd_real_vs_real']:.3f}" in line_with("Fréchet")
    centre = line_with("centre square")
    assert centre.endswith(" / ".join(f"{metrics[f'inpaint_centre_square_{m}_ssim']:.3f}"
                                      for m in ("raster", "full", "mean", "reconstruction")))


def test_summary_of_the_lesion_study_alone():
    metrics = {k: v for k, v in _distinct_metrics().items() if k.startswith("lesion")}
    lines = run_metrics.summary(metrics, Path("surprise.json"))
    assert [line.split(":")[0] for line in lines] == ["Synthetic lesions", "All 4 numbers"]
