"""Grad-CAM (Selvaraju et al., 2017): where in an image the evidence for a class lies.

The backbone's last spatial feature map A (timm's `forward_features`: B x C x H x W) is weighted per channel by
the mean gradient of the class's logit with respect to it, summed over channels and kept where positive:
relu(sum_c mean_hw(d logit / d A_c) * A_c), an H x W map. The head alone is differentiated (the features are a
leaf), so no parameter gets a gradient and the backbone runs without building a graph.
"""

from __future__ import annotations

import torch
from torch import nn


NOT_SPATIAL = "its last features are not a spatial map"


class CamUnavailable(Exception):
    """Grad-CAM cannot be computed for this network: the reason, to print after 'not available for <model>: '."""


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The (B, H, W) Grad-CAM maps of `images` (the model's normalized input) for `classes` (one per image), at
    the feature map's resolution, non-negative. The model is run in eval mode; its parameters and the train/eval
    mode of each of its modules are as they were afterwards.

    Raises:
        CamUnavailable: the network has no `forward_features`/`forward_head` (torchvision models), its features
            are not a B x C x H x W map (a ViT's tokens, channels-last maps) or are 1 x 1, or its forward is not
            the head applied to those features.
    """
    forward_features, forward_head = getattr(model, "forward_features", None), getattr(model, "forward_head", None)
    if not (callable(forward_features) and callable(forward_head)):
        raise CamUnavailable(NOT_SPATIAL)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            features = forward_features(images).float()
            whole = model(images).float()
        if features.ndim != 4 or features.shape[1] != getattr(model, "num_features", features.shape[1]):
            raise CamUnavailable(NOT_SPATIAL)
        if features.shape[2] * features.shape[3] == 1:
            raise CamUnavailable("its last feature map is 1 x 1 at this input size: there is nothing to localise")
        features.requires_grad_(True)
        with torch.enable_grad():
            logits = forward_head(features).float()
            if logits.shape != whole.shape or not torch.allclose(logits, whole, rtol=1e-3, atol=1e-4):
                raise CamUnavailable("its forward is not its head applied to its last features")
            (gradient,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), features)
    finally:
        for module, training in modes.items():
            module.train(training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return (weights * features.detach()).sum(dim=1).clamp(min=0)
