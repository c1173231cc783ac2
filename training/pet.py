"""The not-a-pet signal: ImageNet's own 1000-class head, kept as a second head on the shared backbone features.

pet_score is the probability mass that head puts on the domestic dog breeds (ImageNet 151-268) and the domestic
cats (281-285). It costs one 1280x1000 matrix product per view, well under 1% of MobileNetV2's work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from imaging import IMAGE_SUFFIXES

IMAGENET_DOGS = (151, 269)  # [start, stop): the domestic dog breeds
IMAGENET_CATS = (281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# The wild members of the dog and cat families in ImageNet (WordNet's canine and feline subtrees without the
# domestic breeds): wolves, coyote, dingo, dhole, African hunting dog, hyena, foxes; cougar, lynx and the big cats.
# The nearest non-pets to a pet photo, reported on their own (export/not_a_pet.py).
WILD_RELATIVES = ((269, 281), (286, 294))
CLASS_INDEX = re.compile(r"imagenet_(\d+)_")


def class_index(file: Path) -> int | None:
    """The ImageNet class index in a not-pet file's name (imagenet_<index>_<name>), None for other names."""
    match = CLASS_INDEX.match(file.name)
    return int(match.group(1)) if match else None


def is_wild_relative(file: Path) -> bool:
    index = class_index(file)
    return index is not None and any(start <= index < stop for start, stop in WILD_RELATIVES)


def not_pet_files(root: Path, shows_pet: Sequence[str] = ()) -> dict[str, list[Path]]:
    """The not-pet images split by ImageNet class index: 0 mod 4 for development, the rest held out.

    The files named in shows_pet (pet.shows_pet: ImageNet samples that show a domestic cat or dog after all) are
    set apart under "shows_pet" instead: counting them as non-pets would count a right answer as a miss.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"not-pet images not found at {root} (set pet.not_pets_dir in params.yaml)")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    split: dict[str, list[Path]] = {"dev": [], "held_out": [], "shows_pet": []}
    for file in files:
        index = class_index(file)
        if index is None:  # another file name: split by a stable number all the same
            index = sum(file.name.encode())
        split["shows_pet" if file.name in shows_pet else "dev" if index % 4 == 0 else "held_out"].append(file)
    return split


def pet_files(data_dir: Path, splits: Sequence[str]) -> list[Path]:
    """Every prepared cat and dog photo of the given splits."""
    return sorted(p for s in splits for p in (data_dir / s).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


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
