"""Every setting in one place: the presets (`demo`, `tiny`, `full`), each whole (architecture and
schedules of every stage), what `predict.py` does by default, and how flags override a preset.
A run saves its resolved settings in RUN/config.json; checkpoints carry their stage's part."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from brainvq.io_utils import write_json
from modules import PriorConfig, VQVAEConfig

DEFAULT_PROFILE = "demo"
DEFAULT_RUN = "runs/demo"  # where train.py writes and predict.py and the tools read
LR_DECAYS = ("cosine", "linear")


@dataclass
class StageSettings:
    """Optimisation settings of one stage; saved in its checkpoints."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 100
    # the learning rate after the warm-up: "cosine" or "linear", either down to zero
    lr_decay: str = "cosine"
    l1_weight: float = 0.0  # VQ-VAE only: extra L1 term on the reconstruction
    ssim_weight: float = 0.0  # VQ-VAE only: extra (1 − SSIM) term, SSIM on [0, 1] pixels
    grad_clip: float = 1.0
    # VQ-VAE only: train on random crops (0: whole slices). The model is fully convolutional
    # with per-pixel normalisation, so it then runs unchanged on whole slices; crops spend the
    # compute on brain instead of the black background that fills half of every slice.
    crop: int = 0
    crops_per_image: int = 1  # crops taken from each training image per epoch
    # prior only: start the prior's input embedding from the VQ-VAE codebook's principal
    # components (PixelCNN.embed_like), so similar codes start with similar embeddings
    embed_from_codebook: bool = False
    # prior only: also train on the left-right mirror image of every training slice, encoded
    # by the VQ-VAE: a mirrored brain is a brain (docs/experiments.md#mirrored-training-slices)
    mirror: bool = False

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")


@dataclass(frozen=True)
class Profile:
    """A whole preset: both models' architecture and every stage's schedule."""
    vqvae: VQVAEConfig
    prior: PriorConfig
    vqvae_stage: StageSettings
    # the VQ-VAE's decoder trained on alone, on the frozen code (0 epochs: not at all)
    decoder_stage: StageSettings
    prior_stage: StageSettings


PROFILES: dict[str, Profile] = {
    "demo": Profile(  # sized for a 2-core CPU: the README's first command in ≤ 15 minutes
        # K = 96 codes of 32 dimensions: a code of lower entropy, which the prior models better
        # (docs/experiments.md#the-bits-target-against-the-ssim-target-fewer-codes)
        vqvae=VQVAEConfig(hidden=(16, 32, 64), n_res_blocks=2, embedding_dim=32, n_codes=96,
                          beta=0.25, ema=True, ema_decay=0.99, dead_code_steps=20),
        # width 32 for 6 epochs beat 48 for 3 (docs/experiments.md#a-narrower-prior-trained-longer)
        prior=PriorConfig(n_codes=96, channels=32, kernel_size=3,
                          dilations=(1, 2, 4, 8, 1, 2, 4, 8, 1, 1), grid_size=32,
                          slice_bins=16),
        # batch 4: a CPU's time per sample hardly depends on the batch, so small batches buy
        # more updates (docs/experiments.md#prior-batch-size-more-updates-for-the-same-cpu-time)
        # linear decay: +0.0015–0.002 in-brain SSIM over the cosine on two trainings
        # (docs/experiments.md#the-learning-rates-decay)
        vqvae_stage=StageSettings(epochs=8, batch_size=4, lr=2e-3, ssim_weight=1.0, crop=128,
                                  crops_per_image=2, lr_decay="linear"),
        # the decoder alone on the frozen code gives back the in-brain SSIM that K = 96 and
        # 32 dimensions cost, without moving a single index; 4 epochs at batch 8 scored best on
        # validation (docs/experiments.md#the-decoder-stage-in-the-demo-preset)
        decoder_stage=StageSettings(epochs=4, batch_size=8, lr=2e-3, ssim_weight=1.0,
                                    crop=128, crops_per_image=2, lr_decay="linear"),
        # each training slice and its mirror image for 3 epochs beat the slices alone for 6, in
        # the same CPU time (docs/experiments.md#mirrored-training-slices)
        # linear decay: 0.02–0.05 fewer bits than the cosine in the same time
        # (docs/experiments.md#the-learning-rates-decay)
        prior_stage=StageSettings(epochs=3, batch_size=4, lr=5e-3, embed_from_codebook=True,
                                  mirror=True, lr_decay="linear"),
    ),
    "tiny": Profile(  # smoke tests: seconds on a CPU, not a useful model
        vqvae=VQVAEConfig(hidden=(8, 8, 16), n_res_blocks=1, embedding_dim=8, n_codes=32),
        prior=PriorConfig(n_codes=32, channels=16, dilations=(1, 2, 4, 8, 16, 1), slice_bins=4),
        vqvae_stage=StageSettings(epochs=1, batch_size=8, lr=2e-3, warmup_steps=1, crop=128,
                                  crops_per_image=2, ssim_weight=1.0),
        decoder_stage=StageSettings(epochs=1, batch_size=4, lr=1e-3, warmup_steps=1, crop=128,
                                    crops_per_image=2, ssim_weight=1.0),
        prior_stage=StageSettings(epochs=1, batch_size=8, lr=2e-3, warmup_steps=1,
                                  embed_from_codebook=True),
    ),
    "full": Profile(  # paper-sized, for a GPU and the real OASIS set
        vqvae=VQVAEConfig(hidden=(64, 128, 256), n_res_blocks=4, embedding_dim=64,
                          n_codes=512),
        prior=PriorConfig(n_codes=512, channels=128,
                          dilations=(1, 2, 4, 8, 16, 1, 2, 4, 8, 16, 1, 2, 4, 1, 1),
                          slice_bins=16),
        vqvae_stage=StageSettings(epochs=100, batch_size=32, lr=1e-3, warmup_steps=500,
                                  ssim_weight=1.0, lr_decay="linear"),
        # the demo's rule, scaled (not measured on OASIS)
        decoder_stage=StageSettings(epochs=10, batch_size=32, lr=5e-4, warmup_steps=100,
                                    ssim_weight=1.0, lr_decay="linear"),
        prior_stage=StageSettings(epochs=50, batch_size=64, lr=1e-3, warmup_steps=500,
                                  embed_from_codebook=True, mirror=True, lr_decay="linear"),
    ),
}

# Each training flag (argparse dest) and the preset fields it sets.
FLAG_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "vqvae_epochs": (("vqvae_stage", "epochs"),),
    "decoder_epochs": (("decoder_stage", "epochs"),),
    "prior_epochs": (("prior_stage", "epochs"),),
    "batch_size": (("vqvae_stage", "batch_size"), ("prior_stage", "batch_size")),
    "n_codes": (("vqvae", "n_codes"), ("prior", "n_codes")),
    "embedding_dim": (("vqvae", "embedding_dim"),),
    "beta": (("vqvae", "beta"),),
    "vqvae_widths": (("vqvae", "hidden"),),
    "res_blocks": (("vqvae", "n_res_blocks"),),
    "ssim_weight": (("vqvae_stage", "ssim_weight"),),
    "vqvae_lr": (("vqvae_stage", "lr"),),
    "vqvae_lr_decay": (("vqvae_stage", "lr_decay"),),
    "prior_lr": (("prior_stage", "lr"),),
    "prior_lr_decay": (("prior_stage", "lr_decay"),),
    "prior_channels": (("prior", "channels"),),
    "embed_from_codebook": (("prior_stage", "embed_from_codebook"),),
    "prior_mirror": (("prior_stage", "mirror"),),
}


def resolve(profile: str, flags: dict[str, Any]) -> Profile:
    """The preset `profile` with every flag that was given (not None) taking precedence."""
    parts = {f.name: getattr(PROFILES[profile], f.name) for f in fields(Profile)}
    for flag, value in flags.items():
        for part, name in FLAG_FIELDS[flag] if value is not None else ():
            parts[part] = replace(parts[part], **{name: value})
    return Profile(**parts)


def differences(settings: dict[str, Any], profile: str) -> dict[str, tuple[Any, Any]]:
    """{"part.field": (value, preset's value)} where saved `settings` (a config.json's parts)
    differ from the preset `profile`."""
    preset = asdict(PROFILES[profile])
    return {f"{part}.{name}": (value, preset[part][name])
            for part in preset for name, value in settings.get(part, {}).items()
            if name in preset[part] and _plain(value) != _plain(preset[part][name])}


def _plain(value: Any) -> Any:
    """Tuples as lists, as they come back from JSON."""
    return list(value) if isinstance(value, tuple) else value


def write_run_config(path: Path, profile_name: str, profile: Profile,
                     extra: dict[str, Any]) -> None:
    """RUN/config.json: every resolved setting, the preset's name and what differs from it."""
    parts = asdict(profile)
    changed = {key: {"value": value, "preset": preset}
               for key, (value, preset) in differences(parts, profile_name).items()}
    write_json({"profile": profile_name, **extra, **parts, "changed_from_profile": changed},
               path)


@dataclass(frozen=True)
class InpaintSettings:
    """How full-context inpainting fills a hole (`inference.inpaint_full_context`)."""
    candidates: int  # particles to choose among (and raster fills for the baselines)
    gibbs_sweeps: int
    gibbs_proposals: int
    temperature: float  # of every fill, the raster baselines' included


@dataclass
class PredictSettings:
    """What `predict.py` does with a run, unless flags say otherwise."""
    n_show: int = 6  # test images in the reconstruction and inpainting figures
    n_samples: int = 8  # brains generated from scratch
    temperature: float = 1.0
    # the whole distribution: every nucleus was told from real slices more often
    # (docs/experiments.md#nucleus-sampling)
    top_p: float = 1.0
    seed: int = 0
    n_eval_samples: int = 64  # generated brains scored for memorisation and diversity
    n_inpaint: int = 8  # test images inpainted for the inpainting metrics
    inpaint_candidates: int = 16  # full-context inpainting: particles to choose among ...
    gibbs_sweeps: int = 0  # ... then Gibbs sweeps over the masked sites, ...
    gibbs_proposals: int = 2  # ... each site choosing among this many drawn codes and its own
    # a fill is judged against the truth, so it has a temperature of its own, chosen on
    # validation (docs/experiments.md#inpainting-temperature)
    inpaint_temperature: float = 0.3
    n_surprise: int = 32  # test (and validation) slices that get a lesion (--surprise)
    sampler: str = "fast"  # "fast": cached, each site computed once; "naive": a pass per site
    # relative slice position (0: lowest, 1: highest) of the brains generated from scratch;
    # None: spread evenly from bottom to top
    slice_position: float | None = None

    @property
    def inpaint(self) -> InpaintSettings:
        return InpaintSettings(self.inpaint_candidates, self.gibbs_sweeps, self.gibbs_proposals,
                               self.inpaint_temperature)
