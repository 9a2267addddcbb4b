"""tools.refine_decoder: only the decoder moves, the code stays, and the reconstructions improve."""
import torch

import dataset
import train
from brainvq.checkpoints import checkpoint_path, load_indices, load_vqvae
from brainvq.inference.trained_run import encode_images
from tools import refine_decoder


def _vqvae_run(data_root, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data", str(data_root), "--out", str(run), "--profile", "tiny",
                       "--stage", "vqvae", "--vqvae-epochs", "2", "--batch-size", "4"]) == 0
    return run


def test_refining_moves_only_the_decoder_and_keeps_every_index(tiny_data_root, tmp_path):
    run = _vqvae_run(tiny_data_root, tmp_path)
    out = tmp_path / "refined"
    assert refine_decoder.main(["--run", str(run), "--out", str(out), "--epochs", "3",
                                "--device", "cpu"]) == 0
    before, norm, _ = load_vqvae(checkpoint_path(run, "vqvae", "best"), torch.device("cpu"))
    after, _, state = load_vqvae(checkpoint_path(out, "vqvae", "best"), torch.device("cpu"))
    old, new = before.state_dict(), after.state_dict()
    for name in old:
        same = torch.equal(old[name], new[name])
        assert same != name.startswith("decoder."), name  # decoder changed, nothing else
    images = dataset.load_splits(tiny_data_root, splits=("test",))["test"].images
    device = torch.device("cpu")
    assert torch.equal(encode_images(before, images, norm, device),
                       encode_images(after, images, norm, device))
    assert torch.equal(load_indices(out)["test"], load_indices(run)["test"])  # copied run
    losses = state["decoder_refinement"]["train_loss_by_epoch"]
    assert losses[-1] < losses[0]


def test_refining_lowers_the_reconstruction_loss_on_the_training_slices(tiny_data_root,
                                                                         tmp_path):
    run = _vqvae_run(tiny_data_root, tmp_path)
    cpu = torch.device("cpu")
    model, norm, state = load_vqvae(checkpoint_path(run, "vqvae", "best"), cpu)
    images = dataset.load_splits(tiny_data_root, splits=("train",))["train"].images
    grids = encode_images(model, images, norm, cpu)
    def psnr() -> float:
        return refine_decoder.reconstruction_scores(model, grids, images, norm)["psnr"]

    psnr_before = psnr()
    settings = refine_decoder.StageSettings(**{**state["stage_settings"], "epochs": 4,
                                               "lr": 1e-3})
    refine_decoder.refine(model, grids, images, norm, settings, seed=0)
    assert psnr() > psnr_before + 0.1  # dB


def test_refining_refuses_to_overwrite_the_run_itself(tiny_data_root, tmp_path, capsys):
    run = _vqvae_run(tiny_data_root, tmp_path)
    assert refine_decoder.main(["--run", str(run), "--out", str(run), "--epochs", "1"]) == 2
    assert "--out must differ" in capsys.readouterr().err
