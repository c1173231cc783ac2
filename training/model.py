"""MobileNetV2 with ImageNet weights, a new head, and the freezing policy for transfer learning."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from training.pet import PetHead

IMAGENET = "imagenet"


def add_pretrained_argument(parser: argparse.ArgumentParser) -> None:
    """--pretrained, shared by every command that builds the backbone (env PRETRAINED, else the download)."""
    parser.add_argument(
        "--pretrained",
        default=os.environ.get("PRETRAINED") or IMAGENET,
        help="'imagenet' (torchvision download) or a MobileNetV2 state_dict path; env PRETRAINED",
    )


def build_model(num_classes: int, pretrained: str | None = IMAGENET) -> nn.Module:
    """MobileNetV2 from torchvision's IMAGENET1K_V1 ('imagenet', downloaded) or a state_dict file, with a new head.

    pretrained=None builds the bare architecture, for loading a trained checkpoint into.
    """
    if pretrained == IMAGENET:
        model = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
    elif pretrained is None:
        model = mobilenet_v2()
    else:
        model = mobilenet_v2()
        model.load_state_dict(load_state_dict(Path(pretrained)), strict=True)
    model.classifier[1] = nn.Linear(model.last_channel, num_classes)
    return model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a MobileNetV2 state_dict; a missing or unreadable file is an error, never random weights."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (use 'imagenet' to download torchvision's)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read pretrained weights {path}: {error}") from error
    if not isinstance(state, dict):
        raise TypeError(f"pretrained weights {path} hold a {type(state).__name__}, not a state_dict")
    return state


def imagenet_head_state(pretrained: str) -> dict[str, torch.Tensor]:
    """ImageNet's 1000-class classifier (weight, bias) from the same pretrained weights as the backbone."""
    state = (
        MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        if pretrained == IMAGENET
        else load_state_dict(Path(pretrained))
    )
    return {"weight": state["classifier.1.weight"].clone(), "bias": state["classifier.1.bias"].clone()}


def freeze_backbone(model: nn.Module, unfreeze_blocks: int) -> None:
    """Train only the head and the last unfreeze_blocks feature blocks (0 = head only, all = whole network)."""
    blocks = len(model.features)
    if not 0 <= unfreeze_blocks <= blocks:
        raise ValueError(f"Invalid unfreeze_blocks {unfreeze_blocks}. Only 0 to {blocks} are supported.")
    for parameter in model.parameters():
        parameter.requires_grad = False
    trainable = [model.classifier, *list(model.features)[blocks - unfreeze_blocks :]]
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad = True


def set_train_mode(model: nn.Module) -> None:
    """Train mode with BatchNorm statistics frozen.

    The backbone's BatchNorm statistics come from ImageNet (in the offline weights they are folded
    into the convolutions); re-estimating them from small cat/dog batches would destroy that.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled backbone features the head sees (what the frozen baseline caches)."""
    features = model.features(images)
    return torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)


class Predictor(nn.Module):
    """What is evaluated, exported and served: class probabilities from the classifier's logits.

    With hflip_average, the probabilities are the mean over the photo and its mirror image (horizontal-flip
    test-time averaging, inside the exported graph, so every runtime does the same). It costs two forward
    passes per photo. With a pet_head (training.pet.PetHead) it also returns each photo's pet score, from the
    same pooled features and averaged over the same views: (probabilities, pet_score).
    """

    def __init__(self, model: nn.Module, hflip_average: bool = False, pet_head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.hflip_average = hflip_average
        self.pet_head = pet_head

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        views = torch.cat([images, images.flip(3)]) if self.hflip_average else images
        features = embed(self.model, views)
        probabilities = self.average(torch.softmax(self.model.classifier(features), dim=1), images.shape[0])
        if self.pet_head is None:
            return probabilities
        return probabilities, self.average(self.pet_head(features), images.shape[0])

    def average(self, values: torch.Tensor, batch: int) -> torch.Tensor:
        """The mean over the views of each photo (a no-op for a single view)."""
        if not self.hflip_average:
            return values
        return values.view(2, batch, *values.shape[1:]).mean(0)


def load_predictor(path: Path) -> tuple[Predictor, dict[str, Any]]:
    """A trained checkpoint as the Predictor it is exported as (with its pet head when it has one), and the
    checkpoint."""
    model, checkpoint = load_checkpoint(path)
    pet_head = PetHead(checkpoint["pet_head"]) if checkpoint.get("pet_head") else None
    predictor = Predictor(model, bool(checkpoint.get("hflip_average", False)), pet_head)
    return predictor.eval(), checkpoint


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model in eval mode and its checkpoint (preprocessing spec, lineage, metrics)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run `make train` first)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("arch") != "mobilenet_v2":
        raise ValueError(f"Invalid arch {checkpoint.get('arch')!r} in {path}. Only 'mobilenet_v2' is supported.")
    model = build_model(len(checkpoint["preprocess"]["labels"]), pretrained=None)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint
