"""generation.py's wiring: which slices each sanity case is built from and compared with."""
import numpy as np
import torch

import generation
import sample_scores


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
    assert set(scores) == {"c2st_real_vs_real", "c2st_unigram", "c2st_chimera"}
    assert torch.equal(seen["grids"], reference.other_grids)
    chimeras, real = seen["pairs"][-1]
    # validation codes (8..15) decode to ≥ 127, test codes (0..7) to ≤ 112
    assert chimeras.min() >= 127  # every site of every chimera from a validation grid
    assert real.max() <= 112  # the real side: test reconstructions only
