"""BatchNorm statistics for randomly initialised models, so that they detect as a trained model would."""

from __future__ import annotations

import torch

__all__ = ["calibrate_bn", "calibration_images"]


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, x: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """Sets every BatchNorm's running statistics to those of one training-mode forward pass over ``x`` (on
    ``device``, in float32; the model is left where it was, in the mode it was in).

    A randomly initialised network normalises with identity statistics (mean 0, variance 1), and its activations
    shrink layer by layer until the class logits come out constant or nearly so: every score ties, and detections,
    their agreement between two implementations and the work of post-processing (NMS over tied boxes) are all
    untypical. With the statistics of real activations the logits spread as a trained model's do.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    training = model.training
    place = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one pass, that pass's statistics
        model.to(device).train()
        model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(training).to(place)


def calibration_images(size: tuple[int, int], values: int = 64) -> int:
    """How many images :func:`calibrate_bn` needs for ``values`` positions per channel on the coarsest level (P7,
    1/128 of the input), at least 2. With too few values there (a 1x1 map and 2 images: every normalised value is
    +-1) the logits grow until scores saturate and tie."""
    coarsest = -(-size[0] // 128) * -(-size[1] // 128)
    return max(2, -(-values // coarsest))
