"""Which not-a-pet score: candidate methods compared by cross-validation on development data only.

Every candidate scores "is this a domestic cat or dog" from the frozen ImageNet backbone's pooled features of the
photo and its mirror image (what the exported graph computes). The trained ones (outlier exposure: a logistic
regression of pets against the non-pet images) are fitted on 4 folds and score the 5th, so every development
image is scored by a model that never saw it, and every non-pet image by one that never saw its ImageNet class
(the folder holds one image per class). Each method is then read at the operating point the export uses: the
threshold that keeps `pet.keep_target` of the pets, and the share of non-pets it flags there, with a Wilson 95%
interval and a paired comparison with the shipped method on the same images.

Development data only: the train and val cats and dogs, and the not-pet images the export develops on (ImageNet
class index 0 mod 4). The held-out sets of export/not_a_pet.py are never read here.

    python -m training.pet_methods --pretrained PATH [--data data/processed] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from training.config import DEFAULT_PARAMS, load_params
from training.model import add_pretrained_argument, build_model, embed, imagenet_head_state
from training.pet import IMAGENET_CATS, IMAGENET_DOGS, PetHead, not_pet_files, pet_files
from training.presets import ClassificationPresetEval, ImageLoader, PreprocessSpec
from training.stats import paired, proportion
from training.utils import seed_everything, write_json

SHIPPED = "imagenet_mass"
PET_CLASSES = np.zeros(1000, dtype=bool)
PET_CLASSES[IMAGENET_DOGS[0] : IMAGENET_DOGS[1]] = True
PET_CLASSES[IMAGENET_CATS[0] : IMAGENET_CATS[1]] = True


@torch.inference_mode()
def views_features(files: list[Path], spec: PreprocessSpec, pretrained: str, batch_size: int = 32) -> np.ndarray:
    """(images, 2 views, 1280) pooled ImageNet-backbone features of each file and its mirror image."""
    model = build_model(len(spec.labels), pretrained=pretrained).eval()
    load, transform = ImageLoader(spec=spec), ClassificationPresetEval(spec=spec)
    batches = []
    for start in tqdm(range(0, len(files), batch_size), desc="features", unit="batch", leave=False):
        images: list[Image.Image] = [load(f) for f in files[start : start + batch_size]]
        inputs = torch.stack([transform(image) for image in images])
        features = embed(model, torch.cat([inputs, inputs.flip(3)]))
        batches.append(torch.stack(features.split(len(images)), 1).numpy())
    return np.concatenate(batches)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


class Head:
    """ImageNet's 1000-class head applied to (images, views, 1280) features."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.weight, self.bias = state["weight"].numpy(), state["bias"].numpy()
        self.pet_head = PetHead(state).eval()  # what the exported graph computes

    @torch.inference_mode()
    def shipped(self, features: np.ndarray) -> np.ndarray:
        """The shipped pet_score: training.pet.PetHead on every view, averaged over the views."""
        views = torch.from_numpy(features.reshape(-1, features.shape[-1]))
        return self.pet_head(views).numpy().reshape(features.shape[:2]).mean(1)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def pet_mass(self, features: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """(images, views) softmax mass on the domestic dogs and cats."""
        return softmax(self.logits(features) / temperature)[..., PET_CLASSES].sum(-1)

    def logit_stats(self, features: np.ndarray) -> np.ndarray:
        """A few summaries of the 1000-way answer per image (mean over views): log pet mass, log other mass, top
        pet and top other logit, entropy, top other and top pet probability."""
        logits = self.logits(features)
        probabilities = softmax(logits)
        mass = probabilities[..., PET_CLASSES].sum(-1)
        tiny = 1e-9
        stats = [
            np.log(mass + tiny),
            np.log(1 - mass + tiny),
            logits[..., PET_CLASSES].max(-1),
            logits[..., ~PET_CLASSES].max(-1),
            -(probabilities * np.log(probabilities + tiny)).sum(-1),
            np.log(probabilities[..., ~PET_CLASSES].max(-1) + tiny),
            np.log(probabilities[..., PET_CLASSES].max(-1) + tiny),
        ]
        return np.stack(stats, -1).mean(1)


# A method: (features of the training folds, their is-pet targets, features to score) -> scores, higher = pet.
Method = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def logistic(transform: Callable[[np.ndarray], np.ndarray], c: float) -> Method:
    """Outlier exposure: a balanced, L2-regularized logistic regression of pets against non-pets."""

    def method(train: np.ndarray, targets: np.ndarray, score: np.ndarray) -> np.ndarray:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
        )
        model.fit(transform(train), targets)
        return model.decision_function(transform(score))

    return method


def nearest_pets(k: int) -> Method:
    """Cosine similarity to the k-th most similar training pet (deep nearest neighbours, Sun et al. 2022)."""

    def method(train: np.ndarray, targets: np.ndarray, score: np.ndarray) -> np.ndarray:
        def unit(features: np.ndarray) -> np.ndarray:
            mean = features.mean(1)
            return mean / np.linalg.norm(mean, axis=1, keepdims=True)

        similarity = unit(score) @ unit(train[targets == 1]).T
        return np.sort(similarity, 1)[:, -k]

    return method


def mean_view(features: np.ndarray) -> np.ndarray:
    return features.mean(1)


def methods(head: Head) -> dict[str, tuple[str, Method]]:
    """The candidates: (what it is, how it scores)."""

    def fixed(score: Callable[[np.ndarray], np.ndarray]) -> Method:
        return lambda train, targets, features: score(features)

    def log_probabilities(features: np.ndarray) -> np.ndarray:
        return np.log(softmax(head.logits(features)) + 1e-9).mean(1)

    mass = "the softmax mass of ImageNet's head on the pet classes"
    outlier_exposure = "outlier exposure: balanced logistic regression of pets against non-pets on"
    return {
        SHIPPED: (f"{mass}, mean over the views (shipped)", fixed(head.shipped)),
        "imagenet_mass_max_view": (f"{mass}, the larger of the views", fixed(lambda f: head.pet_mass(f).max(1))),
        "imagenet_mass_t0.5": (f"{mass} at temperature 0.5", fixed(lambda f: head.pet_mass(f, 0.5).mean(1))),
        "imagenet_mass_t2": (f"{mass} at temperature 2", fixed(lambda f: head.pet_mass(f, 2.0).mean(1))),
        "nearest_pets_k5": ("cosine similarity to the 5th nearest training pet", nearest_pets(5)),
        "oe_logistic_features": (f"{outlier_exposure} the 1280 pooled features, C=0.01", logistic(mean_view, 0.01)),
        "oe_logistic_logit_stats": (f"{outlier_exposure} 7 summaries of ImageNet's answer, C=0.1",
                                    logistic(head.logit_stats, 0.1)),
        "oe_logistic_log_probabilities": (f"{outlier_exposure} ImageNet's 1000 log-probabilities, C=0.03",
                                          logistic(log_probabilities, 0.03)),
    }  # fmt: skip


def out_of_fold(method: Method, features: np.ndarray, targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Every image scored by the method fitted on the other folds (stratified by pet / non-pet)."""
    scores = np.empty(len(targets))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, targets):
        scores[test] = method(features[train], targets[train], features[test])
    return scores


def flagged_at_keep(pet_scores: np.ndarray, other_scores: np.ndarray, keep: float) -> tuple[float, np.ndarray]:
    """The threshold keeping `keep` of the pets (as export/not_a_pet.py chooses it) and which non-pets it flags."""
    allowed_misses = int(np.floor((1 - keep) * len(pet_scores) + 1e-9))
    threshold = float(np.sort(pet_scores)[allowed_misses])
    return threshold, other_scores < threshold


def compare(features: np.ndarray, targets: np.ndarray, head: Head, keeps: tuple[float, ...], repeats: int,
            folds: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """Every method's out-of-fold operating points, averaged over repeats, and paired with the shipped method."""
    candidates = methods(head)
    flagged: dict[str, dict[float, list[np.ndarray]]] = {name: {k: [] for k in keeps} for name in candidates}
    for repeat in range(repeats):
        for name, (_, method) in candidates.items():
            scores = out_of_fold(method, features, targets, folds, seed + repeat)
            for keep in keeps:
                flagged[name][keep].append(flagged_at_keep(scores[targets == 1], scores[targets == 0], keep)[1])
    results: dict[str, Any] = {}
    for name, (description, _) in candidates.items():
        entry: dict[str, Any] = {"description": description}
        for keep in keeps:
            runs = np.array(flagged[name][keep])  # (repeats, non-pets)
            # the same images, this method vs the shipped one, in every repeat (McNemar's p uncorrected for the
            # number of methods compared)
            versus = [paired(shipped, run) for shipped, run in zip(flagged[SHIPPED][keep], runs, strict=True)]
            entry[f"keep_{keep}"] = {
                "flagged_not_pets": proportion(round(float(runs.sum(1).mean())), runs.shape[1]),
                "flagged_per_repeat": runs.sum(1).astype(int).tolist(),
                "vs_shipped_per_repeat": [
                    {k: v[k] for k in ("only_reference_right", "only_candidate_right", "mcnemar_p")} for v in versus
                ],
            }
        results[name] = entry
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    add_pretrained_argument(parser)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="cross-validation repeats with different fold draws")
    parser.add_argument("--out", type=Path, default=Path("reports/pet-methods.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    if params.pet is None:
        raise SystemExit("params.yaml has no pet section")
    seed_everything(params.train.seed)
    spec = PreprocessSpec.from_dict(params.preprocess)
    data_dir = args.data or Path(params.data.processed_dir)
    pets = pet_files(data_dir, ("train", "val"))
    others = not_pet_files(Path(params.pet.not_pets_dir), params.pet.shows_pet)["dev"]
    if not pets or not others:
        raise SystemExit(f"need prepared pets in {data_dir} and not-pet images in {params.pet.not_pets_dir}")
    started = time.perf_counter()
    features = views_features(pets + others, spec, args.pretrained)
    targets = np.r_[np.ones(len(pets), dtype=int), np.zeros(len(others), dtype=int)]
    head = Head(imagenet_head_state(args.pretrained))
    keeps = tuple(sorted({params.pet.keep_target, 0.997}, reverse=True))
    results = compare(features, targets, head, keeps, args.repeats, args.folds, params.train.seed)
    report = {
        "data": {"pets": f"{data_dir}/train + val ({len(pets)} photos)",
                 "not_pets": f"{params.pet.not_pets_dir}, ImageNet class index 0 mod 4 ({len(others)} images)"},
        "protocol": f"{args.repeats} x stratified {args.folds}-fold cross-validation; flagged non-pets at the "
                    "threshold keeping each share of the out-of-fold pet scores",
        "keep_targets": list(keeps),
        "seconds": round(time.perf_counter() - started, 1),
        "methods": results,
    }  # fmt: skip
    write_json(args.out, report)
    for name, entry in results.items():
        cells = [f"{entry[f'keep_{k}']['flagged_not_pets']['rate']:.3f}" for k in keeps]
        print(f"{name:32s} " + "  ".join(f"keep {k}: {c}" for k, c in zip(keeps, cells, strict=True)))
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
