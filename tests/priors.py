"""Small random priors for the sampler and inpainting tests."""
import torch

from modules import PixelCNN, PriorConfig


def random_prior(sharpness: float = 1.0, **config) -> PixelCNN:
    """A seeded random PixelCNN in eval mode (24 codes, 12 channels, dilations 1, 2, 1 unless
    `config` says otherwise). A random prior is near uniform: `sharpness` scales its last layer
    so that a site's code depends on its context; a conditioned one gets slice vectors of a
    trained prior's size, so that the condition matters."""
    torch.manual_seed(0)
    model = PixelCNN(PriorConfig(**{"n_codes": 24, "channels": 12, "dilations": (1, 2, 1),
                                    **config})).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(sharpness)
        if model.slice_embedding is not None:
            model.slice_embedding.weight.normal_(0, 1)
    return model
