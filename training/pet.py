"""The not-a-pet signal: ImageNet's own 1000-class head, kept as a second head on the shared backbone features.

pet_score is the probability mass that head puts on the domestic dog breeds (ImageNet 151-268) and the domestic
cats (281-285). It costs one 1280x1000 matrix product per view, well under 1% of MobileNetV2's work.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_DOGS = (151, 269)  # [start, stop): the domestic dog breeds
IMAGENET_CATS = (281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


class PetHead(nn.Module):
    """Pooled backbone features -> probability that the photo shows a domestic cat or dog."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        weight = state["weight"]
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.linear.load_state_dict(state)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.linear(features), dim=1)
        dogs = probabilities[:, IMAGENET_DOGS[0] : IMAGENET_DOGS[1]].sum(1)
        cats = probabilities[:, IMAGENET_CATS[0] : IMAGENET_CATS[1]].sum(1)
        return dogs + cats
