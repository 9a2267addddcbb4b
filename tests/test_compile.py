"""`train.py --compile`: torch.compile for training changes the kernels, not the run.

The models are traced as on a GPU, but with the "aot_eager" backend: the graphs, their breaks
and the backward pass are torch.compile's, the kernels eager ones. Inductor's own C++ build
would take a minute here and fails under ATEN_CPU_CAPABILITY=default (PyTorch 2.13); its
kernels are checked on a GPU (.ci/gpu_check).
"""
import json

import pytest
import torch

import train
from brainvq import checkpoints
from brainvq.training import stages


def test_compiled_training_matches_eager_and_saves_plain_weights(tiny_data_root, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(stages, "COMPILE_BACKEND", "aot_eager")
    compiled_parts = []

    def spy(model):
        compile_for_training(model)
        compiled_parts.extend(name or type(model).__name__ for name, part in
                              model.named_modules() if part._compiled_call_impl is not None)

    compile_for_training = stages.compile_for_training
    monkeypatch.setattr(stages, "compile_for_training", spy)
    histories = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled_{compiled}"
        assert train.main(["--data", str(tiny_data_root), "--out", str(run), "--profile", "tiny",
                           "--batch-size", "4", "--seed", "1", "--device", "cpu"]
                          + ["--compile"] * compiled) == 0
        histories[compiled] = {stage: json.loads((run / f"history_{stage}.json").read_text())[-1]
                               for stage in ("vqvae", "decoder", "prior")}
    # Fused kernels round differently, and a code choice may flip: close, not equal.
    for stage, key in (("vqvae", "val_recon"), ("vqvae", "val_ssim"), ("decoder", "val_recon"),
                       ("prior", "val_bits_per_index")):
        eager, compiled = histories[False][stage][key], histories[True][stage][key]
        assert compiled == pytest.approx(eager, rel=0.02), (stage, key)
    # the quantiser stays eager; stage 1b compiles the decoder it trains
    assert compiled_parts == ["encoder", "decoder", "Decoder", "PixelCNN"]
    # in-place compilation leaves the state-dict keys alone: the checkpoints load strictly
    device = torch.device("cpu")
    checkpoints.load_run_vqvae(run, device)
    checkpoints.load_prior(run / "prior_best.pt", device)
    assert json.loads((run / "config.json").read_text())["compile"] is True
