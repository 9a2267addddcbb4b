"""tools/attention_probe.py: a causal self-attention block in the gated PixelCNN reads only sites
before the one it predicts, and the script reports each variant beside its control."""
import torch
from torch import nn

from modules import PriorConfig
from tools.attention_probe import AttentionPixelCNN

CFG = PriorConfig(n_codes=16, channels=8, dilations=(1, 2, 1), grid_size=8, slice_bins=4)


def _logit_change(causal: bool, site: tuple[int, int]) -> torch.Tensor:
    """(H, W): how much each site's logits move when the index at `site` changes."""
    torch.manual_seed(0)
    model = AttentionPixelCNN(CFG, after=(0, 2), causal=causal).eval()
    for block in model.attention:  # the blocks start as no change: give them weights
        nn.init.normal_(block.out.weight, std=0.5)
    grid = torch.randint(0, CFG.n_codes, (1, 6, 7))
    other = grid.clone()
    other[(0, *site)] = (grid[(0, *site)] + 1) % CFG.n_codes
    positions = torch.tensor([0.3])
    with torch.no_grad():
        return (model(grid, positions) - model(other, positions)).abs().amax(1)[0]


def test_a_site_and_every_site_before_it_never_see_its_index():
    site = (3, 4)
    change = _logit_change(causal=True, site=site)
    raster = torch.arange(change.numel()).view(change.shape)
    up_to_site = raster <= raster[site]
    assert change[up_to_site].max() < 1e-5
    assert change[~up_to_site].max() > 1e-3  # later sites do


def test_without_the_causal_mask_earlier_sites_see_it():
    change = _logit_change(causal=False, site=(3, 4))
    assert change[:3].max() > 1e-3  # the control: attention that sees every site leaks
