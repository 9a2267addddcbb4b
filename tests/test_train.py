import torch

from engine import epoch_batches
from train import PROFILES, apply_profile, parse_args, random_crops


def test_random_crops_sit_on_the_code_lattice_inside_the_margin():
    images = torch.arange(256).repeat(256, 1)[None].repeat(50, 1, 1)  # pixel value = column
    rows = torch.arange(256)[:, None].repeat(1, 256)[None].repeat(50, 1, 1)
    g = torch.Generator().manual_seed(0)
    cols = random_crops(images, 128, g)
    g = torch.Generator().manual_seed(0)
    rws = random_crops(rows, 128, g)
    assert cols.shape == (50, 128, 128)
    left, top = cols[:, 0, 0], rws[:, 0, 0]
    for offset in (left, top):
        assert (offset % 8 == 0).all()
        assert offset.min() >= 16 and (offset + 128).max() <= 256 - 16
    assert len(set(left.tolist())) > 3  # offsets vary between images
    assert torch.equal(random_crops(images, 0, g), images)


def test_epoch_batches_cover_every_sample_once_and_are_reproducible():
    batches = epoch_batches(10, 3, seed=1, epoch=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(10, 3, 1, 2), strict=True))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(10, 3, 1, 3)))


def test_flags_override_the_profile():
    args = parse_args(["--profile", "full", "--n-codes", "128", "--embedding-dim", "16",
                       "--vqvae-epochs", "3", "--batch-size", "5"])
    assert args.vqvae_config.n_codes == 128 and args.vqvae_config.embedding_dim == 16
    assert args.vqvae_config.hidden == PROFILES["full"]["vqvae"].hidden
    assert args.vqvae_stage.epochs == 3 and args.vqvae_stage.batch_size == 5
    assert args.prior_stage.epochs == PROFILES["full"]["prior_stage"].epochs
    args.profile = "demo"
    apply_profile(args)
    assert args.vqvae_config.hidden == PROFILES["demo"]["vqvae"].hidden
