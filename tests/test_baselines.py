import torch

from brainvq.evaluation.baselines import SeedStylePixelCNN
from brainvq.inference.sampling import sample


def test_seed_style_prior_is_causal_and_feeds_indices_as_a_scalar():
    torch.manual_seed(0)
    model = SeedStylePixelCNN(n_codes=16, channels=8).eval().double()
    grid = torch.randint(16, (1, 6, 6))
    assert model(grid).shape == (1, 16, 6, 6)
    later = grid.clone()
    later[0, 3, 4] = (later[0, 3, 4] + 1) % 16
    assert torch.equal(model(grid)[0, :, 3, 4], model(later)[0, :, 3, 4])
    # a scalar input: codes 0 and 1 differ by 1/15 of the input range, codes 0 and 15 by all
    one, far = grid.clone(), grid.clone()
    one[0, 0, 0], far[0, 0, 0] = 1, 15
    grid[0, 0, 0] = 0
    near_change = (model(one) - model(grid)).abs().max()
    far_change = (model(far) - model(grid)).abs().max()
    assert 0 < near_change < far_change
    filled = sample(model, torch.full((2, 4, 4), -1), generator=torch.Generator().manual_seed(0))
    assert ((filled >= 0) & (filled < 16)).all()
