"""Stage 1b, the decoder alone on the frozen code: only the decoder moves, every index stays, the
reconstructions improve, and the run's models use it (tiny runs, CPU)."""
import shutil

import pytest
import torch

import dataset
import train
from brainvq.checkpoints import checkpoint_path, load_indices, load_run_vqvae, load_vqvae
from brainvq.data.slices import to_unit
from brainvq.evaluation.metrics import batch_scores, mean_scores
from brainvq.inference.trained_run import Run, decode_indices, encode_images
from brainvq.io_utils import RunError, load_checkpoint, save_checkpoint

CPU = torch.device("cpu")
TINY = ["--profile", "tiny", "--vqvae-epochs", "2", "--prior-epochs", "1", "--batch-size", "4"]


def _train(data_root, run, *extra):
    assert train.main(["--data", str(data_root), "--out", str(run), *TINY, *extra]) == 0
    return run


@pytest.fixture(scope="module")
def refined_run(tiny_data_root, tmp_path_factory):
    return _train(tiny_data_root, tmp_path_factory.mktemp("runs") / "refined",
                  "--decoder-epochs", "4")


def _psnr(model, norm, images):
    decoded = decode_indices(model, encode_images(model, images, norm, CPU), norm, CPU)
    return mean_scores(batch_scores(torch.from_numpy(to_unit(images)),
                                    torch.from_numpy(decoded)))["psnr"]


def test_only_the_decoder_moves_and_every_index_stays(refined_run, tiny_data_root):
    before, norm, _ = load_vqvae(checkpoint_path(refined_run, "vqvae", "best"), CPU)
    after, _, _ = load_run_vqvae(refined_run, CPU)
    old, new = before.state_dict(), after.state_dict()
    for name in old:
        assert torch.equal(old[name], new[name]) != name.startswith("decoder."), name
    images = dataset.load_splits(tiny_data_root, splits=("test",))["test"].images
    assert torch.equal(encode_images(after, images, norm, CPU), load_indices(refined_run)["test"])


def test_the_refined_decoder_reconstructs_the_training_slices_better(refined_run,
                                                                     tiny_data_root):
    before, norm, _ = load_vqvae(checkpoint_path(refined_run, "vqvae", "best"), CPU)
    after, _, _ = load_run_vqvae(refined_run, CPU)
    images = dataset.load_splits(tiny_data_root, splits=("train",))["train"].images
    assert _psnr(after, norm, images) > _psnr(before, norm, images) + 0.1  # dB
    history = load_checkpoint(checkpoint_path(refined_run, "decoder", "last"))["history"]
    assert len(history) == 4 and history[-1]["train_recon"] < history[0]["train_recon"]


def test_the_runs_models_decode_with_the_refined_decoder(refined_run):
    refined = load_checkpoint(checkpoint_path(refined_run, "decoder", "best"))["model"]
    decoder = Run(refined_run, CPU).vqvae.decoder.state_dict()
    assert all(torch.equal(decoder[k], refined[k]) for k in refined)


def test_a_decoder_refined_on_another_code_is_refused(refined_run, tmp_path):
    run = tmp_path / "stale"
    shutil.copytree(refined_run, run)
    path = checkpoint_path(run, "decoder", "best")
    state = load_checkpoint(path)
    save_checkpoint({**state, "codebook": state["codebook"] + 1}, path)
    with pytest.raises(RunError, match="another VQ-VAE's code"):
        load_run_vqvae(run, CPU)


def test_a_new_vqvae_drops_the_old_decoder_and_the_prior_is_the_same_without_it(
        refined_run, tiny_data_root, tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    for which in ("last", "best"):  # an earlier refinement, left in the folder
        shutil.copy(checkpoint_path(refined_run, "decoder", which), run)
    _train(tiny_data_root, run, "--decoder-epochs", "0", "--overwrite")
    assert not list(run.glob("decoder_*.pt"))
    plain = load_checkpoint(checkpoint_path(run, "prior", "best"))["model"]
    refined = load_checkpoint(checkpoint_path(refined_run, "prior", "best"))["model"]
    assert all(torch.equal(plain[k], refined[k]) for k in plain)  # stage 1b leaves the RNG


def test_resuming_the_decoder_with_another_schedule_is_refused(refined_run, tiny_data_root,
                                                                capsys):
    assert train.main(["--data", str(tiny_data_root), "--out", str(refined_run), *TINY,
                       "--stage", "decoder", "--decoder-epochs", "5", "--resume"]) == 2
    assert "epochs 4 (now 5)" in capsys.readouterr().err


def test_a_trained_runs_decoder_can_be_refined_again_alone(refined_run, tiny_data_root,
                                                            tmp_path):
    run = tmp_path / "again"
    shutil.copytree(refined_run, run)
    assert train.main(["--data", str(tiny_data_root), "--out", str(run), *TINY,
                       "--stage", "decoder", "--decoder-epochs", "1", "--overwrite"]) == 0
    assert len(load_checkpoint(checkpoint_path(run, "decoder", "last"))["history"]) == 1
    for name in ("prior_best.pt", "vqvae_best.pt"):  # nothing else moves
        assert (run / name).read_bytes() == (refined_run / name).read_bytes(), name
    new, old = load_indices(run), load_indices(refined_run)
    assert all(torch.equal(new[s], old[s]) for s in ("train", "validate", "test"))
