"""The prior's context encoder and context_probe.py: what the given indices after a hole, which
raster order never sees, tell about the hole."""
import json

import torch

from brainvq.inference.masks import random_rectangles
from modules import PixelCNN, PriorConfig, bits
from priors import random_prior
from tools import context_probe


def _holed(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 8, 8) random grids and the same with a 4×4 hole (−1)."""
    grids = torch.randint(24, (n, 8, 8), generator=torch.Generator().manual_seed(1))
    holed = grids.clone()
    holed[:, 2:6, 2:6] = -1
    return grids, holed


def _with_random_encoder() -> PixelCNN:
    """A random prior with a context encoder whose (zero-started) projections are random."""
    model = random_prior(grid_size=8, slice_bins=5, context_channels=8)
    with torch.no_grad():
        model.context_encoder.embedding.weight.normal_(0, 1)
        for layer in model.layers:
            layer.context_to_v.weight.normal_(0, 0.5)
            layer.context_to_h.weight.normal_(0, 0.5)
    return model


def test_a_hole_site_sees_the_context_after_it_but_no_later_hole_site():
    model = _with_random_encoder()
    grids, holed = _holed(1)
    logits = model(grids, None, holed)
    later_in_hole = grids.clone()
    later_in_hole[0, 4, 4] = (grids[0, 4, 4] + 1) % 24
    moved = (model(later_in_hole, None, holed) - logits).abs().amax(1)[0] > 0
    assert not moved[:4].any() and not moved[4, :5].any()  # raster order up to (4, 4)
    assert moved[4, 5:].all()
    below = holed.clone()
    below[0, 7, 3] = (holed[0, 7, 3] + 1) % 24  # a given site after the whole hole
    assert (model(grids, None, below) - logits)[0, :, 2, 2].abs().max() > 1e-3


def test_given_nothing_the_context_encoder_leaves_the_plain_prior():
    model = _with_random_encoder()
    grids, _ = _holed()
    where = torch.tensor([0.1, float("nan"), 0.9])
    plain = model(grids, where)
    torch.testing.assert_close(model(grids, where, torch.full_like(grids, -1)), plain)
    # a new encoder starts at zero: whatever the context, the prior it was added to
    prior = random_prior(grid_size=8, slice_bins=5)
    fresh = context_probe.with_context_encoder(prior, channels=8)
    torch.testing.assert_close(fresh(grids, where, _holed()[1]), prior(grids, where))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all("context" in n for n in trainable)


def test_random_holes_are_rectangles_of_the_asked_sizes():
    holes = random_rectangles(400, 32, torch.Generator().manual_seed(0))
    for hole in holes:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 4 <= len(rows) <= 24 and 4 <= len(cols) <= 24
        assert hole.sum() == len(rows) * len(cols)  # a filled rectangle
        assert len(rows) == rows[-1] - rows[0] + 1 and len(cols) == cols[-1] - cols[0] + 1
    assert torch.equal(holes, random_rectangles(400, 32, torch.Generator().manual_seed(0)))


def _trained_prior(mirrored: bool) -> tuple[PixelCNN, torch.Tensor]:
    """A small prior trained on 256 grids of 16×16 whose every site holds its row's code (row
    mod 8) or, half the time, a random one; with `mirrored`, the bottom half repeats the top
    half (the context on one side of a hole tells what the other half holds), otherwise
    nothing but the row tells a site's code. Returns the prior and the grids."""
    data = torch.Generator().manual_seed(0)
    rows = (torch.arange(16) % 8).view(1, 16, 1).expand(256, 16, 16)
    grids = torch.where(torch.rand(256, 16, 16, generator=data) < 0.5, rows,
                        torch.randint(8, (256, 16, 16), generator=data))
    if mirrored:
        grids[:, 8:] = grids[:, :8]
    torch.manual_seed(0)
    model = PixelCNN(PriorConfig(n_codes=8, channels=8, dilations=(1, 2, 1), grid_size=16))
    optimiser = torch.optim.Adam(model.parameters(), 2e-2)
    for step in range(60):
        batch = grids[step % 16 * 16: step % 16 * 16 + 16]
        loss = bits(model(batch), batch, "mean")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval().requires_grad_(False), grids


def _probe(mirrored: bool) -> dict:
    prior, grids = _trained_prior(mirrored)
    indices = {"train": grids[:192], "validate": grids[192:]}
    return context_probe.probe(prior, indices, channels=8, steps=150, batch_size=16, lr=1e-2,
                               seed=0, device=torch.device("cpu"))


def test_the_probe_finds_what_the_context_tells_and_only_that():
    told, untold = _probe(mirrored=True), _probe(mirrored=False)
    for result in (told, untold):
        for row in (result["random"], result["centre_square"]):
            # the control: with the hole's own codes in its input the encoder learns to read
            # them (half the codes are random: ~1.5 of 2.3 bits there to gain)
            assert row["leaked_gain_bits"] > 0.5
    # mirrored halves: the other half's copy, in the context, tells much of a hole
    assert told["random"]["context_gain_bits"] > 0.5
    # nothing but the row: the context tells nothing, the probe gains (almost) nothing
    for row in (untold["random"], untold["centre_square"]):
        assert abs(row["context_gain_bits"]) < 0.1
    json.dumps(told)  # what the script writes


def test_the_script_writes_its_table(tmp_path, monkeypatch, capsys):
    prior, grids = _trained_prior(mirrored=True)
    monkeypatch.setattr(context_probe, "load_prior", lambda *_: prior)
    monkeypatch.setattr(context_probe, "load_indices",
                        lambda _run: {"train": grids[:192], "validate": grids[192:]})
    code = context_probe.main(["--run", str(tmp_path), "--device", "cpu", "--steps", "5",
                               "--channels", "4"])
    assert code == 0
    saved = json.loads((tmp_path / "context_probe.json").read_text())
    assert saved["steps"] == 5 and "centre_square" in saved
    assert "| centre_square |" in capsys.readouterr().out
