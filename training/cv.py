"""K-fold cross-validation of the training recipes on train+val: choose a recipe without touching the test split.

On ~200 validation photos one photo is half a point and a fine-tuned model reaches 100% after one epoch,
so the validation split cannot rank recipes. Cross-validation over train+val holds out every one of
those ~1,800 photos once. Each fold runs the pipeline's own steps: the linear probe on cached features
(the baseline), then fine-tuning from that probe (the final recipe), scored after every epoch, with and
without horizontal-flip test-time averaging.

    python -m training.cv --pretrained PATH [--folds 5] [--epochs 6] [--set final.lr=3e-4 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from training.config import DEFAULT_PARAMS, AugmentParams, StageParams, load_params
from training.model import Predictor, add_pretrained_argument, build_model, freeze_backbone
from training.presets import ClassificationPresetEval, ClassificationPresetTrain, PreprocessSpec
from training.train import extract_features, fit, load_data, make_loader, make_optimizer, predict, train_one_epoch
from training.utils import pick_device, seed_everything, write_json


class InMemory(Dataset):
    """Decoded photos kept in memory, so each fold and epoch skips JPEG decoding."""

    def __init__(self, images: list[Any], targets: list[int], transform: Any) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.targets[index]


def subset(images: list[Any], targets: list[int], indices: np.ndarray, transform: Any) -> InMemory:
    return InMemory([images[i] for i in indices], [targets[i] for i in indices], transform)


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per sample: scikit-learn's StratifiedKFold, shuffled with the seed (as training.pet_methods)."""
    assignment = np.empty(len(targets), dtype=np.int64)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros((len(targets), 1)), targets)):
        assignment[held_out] = fold
    return assignment


@torch.inference_mode()
def views(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Probabilities of the held-out photos from one pass and flip-averaged, as training.model.Predictor exports."""
    return {
        "plain": predict(Predictor(model), loader, device)[0],
        "flip": predict(Predictor(model, hflip_average=True), loader, device)[0],
    }


def score(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    clipped = np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0)
    return {"errors": int((probs.argmax(1) != targets).sum()), "nll": float(-np.log(clipped).mean())}


def apply_overrides(stage: StageParams, overrides: list[str]) -> StageParams:
    """final.KEY=VALUE (or final.augment.KEY=VALUE) on the final stage's parameters."""
    raw = asdict(stage)
    for item in overrides:
        key, _, value = item.partition("=")
        path = key.removeprefix("final.").split(".")
        target = raw
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = type(target[path[-1]])(yaml.safe_load(value))  # "5e-5" is a string to YAML 1.1
    augment = raw.pop("augment")
    return StageParams(**raw, augment=AugmentParams(**augment) if augment else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = load_params(args.params)
    spec = PreprocessSpec.from_dict(params.preprocess)
    settings = params.train
    final = apply_overrides(replace(settings.final, epochs=args.epochs, patience=args.epochs), args.set)
    device = pick_device()
    data_dir = args.data or Path(params.data.processed_dir)
    identity = lambda image: image  # noqa: E731
    images, targets = [], []
    for split in ("train", "val"):
        dataset = load_data(data_dir, split, spec, identity)
        for index in range(len(dataset)):
            image, target = dataset[index]
            images.append(image)
            targets.append(target)
    target_array = np.array(targets)
    assignment = stratified_folds(target_array, args.folds, settings.seed)
    evaluation = ClassificationPresetEval(spec=spec)
    augment = asdict(final.augment) if final.augment else {}
    training = ClassificationPresetTrain(spec=spec, **augment)

    seed_everything(settings.seed)
    backbone = build_model(len(spec.labels), args.pretrained).to(device, memory_format=torch.channels_last)
    initial = copy.deepcopy(backbone.state_dict())
    features = extract_features(backbone, make_loader(InMemory(images, targets, evaluation), 64, 0), device, "features")

    baseline = {"plain": np.zeros((len(targets), 2)), "flip": np.zeros((len(targets), 2))}
    per_epoch = [
        {"plain": np.zeros((len(targets), 2)), "flip": np.zeros((len(targets), 2))} for _ in range(args.epochs)
    ]
    started = time.perf_counter()
    for fold in range(args.run_folds or args.folds):
        held, kept = np.flatnonzero(assignment == fold), np.flatnonzero(assignment != fold)
        seed_everything(settings.seed + fold)
        model = build_model(len(spec.labels), None).to(device, memory_format=torch.channels_last)
        model.load_state_dict(initial)
        kept_features = TensorDataset(*(t[kept] for t in features.tensors))
        head = make_loader(kept_features, settings.batch_size, 0, shuffle=True)
        # the probe's epoch is chosen on its own training part: the held-out fold stays unseen
        fit(model.classifier, head, make_loader(kept_features, 256, 0), settings.baseline, device, track=False)

        held_loader = make_loader(subset(images, targets, held, evaluation), 64, 0)
        for view, probs in views(model, held_loader, device).items():
            baseline[view][held] = probs
        print(
            f"fold {fold}: baseline errors {score(baseline['plain'][held], target_array[held])['errors']}", flush=True
        )

        freeze_backbone(model, final.unfreeze_blocks)
        optimizer, scheduler = make_optimizer(model, final)
        train_loader = make_loader(
            subset(images, targets, kept, training), settings.batch_size, 0, shuffle=True, seed=settings.seed
        )
        for epoch in range(args.epochs):
            desc = f"fold {fold} epoch {epoch + 1}"
            train_one_epoch(model, train_loader, optimizer, device, desc, final.label_smoothing)
            scheduler.step()
            for view, probs in views(model, held_loader, device).items():
                per_epoch[epoch][view][held] = probs
            print(f"{desc}: errors {score(per_epoch[epoch]['plain'][held], target_array[held])['errors']}", flush=True)

    ran = assignment < (args.run_folds or args.folds)
    target_array = target_array[ran]
    baseline = {view: probs[ran] for view, probs in baseline.items()}
    per_epoch = [{view: probs[ran] for view, probs in row.items()} for row in per_epoch]
    result = {
        "samples": int(ran.sum()),
        "folds": args.folds,
        "final": asdict(final),
        "seconds": time.perf_counter() - started,
        "baseline": {view: score(probs, target_array) for view, probs in baseline.items()},
        "final_by_epoch": [{view: score(probs, target_array) for view, probs in row.items()} for row in per_epoch],
    }
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    add_pretrained_argument(parser)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--run-folds", type=int, default=None, help="run only the first N folds (a quick look)")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs, each scored")
    parser.add_argument("--set", action="append", default=[], metavar="final.KEY=VALUE", help="override the recipe")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
