"""Train the frozen-backbone baseline and the fine-tuned final model, tracked in MLflow."""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import DatasetFolder
from tqdm import tqdm

from imaging import EXTENSIONS
from training import tracking
from training.config import DEFAULT_PARAMS, Params, StageParams, load_params
from training.metrics import classification_report, plot_confusion_matrix
from training.model import (
    IMAGENET,
    Predictor,
    add_pretrained_argument,
    build_model,
    embed,
    freeze_backbone,
    imagenet_head_state,
    set_train_mode,
)
from training.presets import ClassificationPresetEval, ClassificationPresetTrain, ImageLoader, PreprocessSpec
from training.stats import proportion
from training.utils import git_commit, pick_device, seed_everything, sha256_file, write_json

STAGES = ("baseline", "final")


def load_data(root: Path, split: str, spec: PreprocessSpec, transform: Callable[..., torch.Tensor]) -> DatasetFolder:
    """One split of the prepared ImageFolder; its class order must be the spec's label order."""
    # allow_empty: a tiny dataset may leave a class out of a split; the class order must not shift because of it
    dataset = DatasetFolder(
        str(root / split), loader=ImageLoader(spec=spec), extensions=tuple(sorted(set(EXTENSIONS.values()))),
        transform=transform, allow_empty=True,
    )  # fmt: skip
    if tuple(dataset.classes) != spec.labels:
        raise ValueError(f"{root / split} has classes {dataset.classes}, expected {list(spec.labels)}")
    if len(dataset) == 0:
        raise ValueError(f"{root / split} holds no images")
    return dataset


def make_loader(dataset: Any, batch_size: int, workers: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
        persistent_workers=workers > 0,
    )  # fmt: skip


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images go channels-last (NHWC), which MobileNetV2's depthwise convolutions run much faster in on a CPU."""
    memory_format = torch.channels_last if inputs.dim() == 4 else torch.contiguous_format
    return inputs.to(device, memory_format=memory_format)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str,
    label_smoothing: float = 0.0,
) -> tuple[float, float]:
    """One pass over the training data; returns mean loss and accuracy."""
    set_train_mode(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(loader, desc=desc, leave=False, unit="batch")
    for inputs, targets in progress:
        inputs, targets = to_device(inputs, device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        progress.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    return total_loss / seen, correct / seen


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, predictions and targets over a loader, in eval mode."""
    model.eval()
    losses, predictions, targets = [], [], []
    for inputs, batch_targets in loader:
        logits = model(to_device(inputs, device))
        losses.append(nn.functional.cross_entropy(logits, batch_targets.to(device), reduction="sum").item())
        predictions.append(logits.argmax(1).cpu())
        targets.append(batch_targets)
    all_targets = torch.cat(targets).numpy()
    return sum(losses) / len(all_targets), torch.cat(predictions).numpy(), all_targets


@torch.inference_mode()
def predict(predictor: Predictor, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets over a loader, as the exported model computes them."""
    predictor.eval()
    probabilities, targets = [], []
    for inputs, batch_targets in loader:
        probabilities.append(predictor(to_device(inputs, device)).cpu())
        targets.append(batch_targets)
    return torch.cat(probabilities).numpy(), torch.cat(targets).numpy()


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, desc: str) -> TensorDataset:
    """Run the frozen backbone once, so the baseline head trains on cached features."""
    model.eval()
    features, targets = [], []
    for inputs, batch_targets in tqdm(loader, desc=desc, leave=False, unit="batch"):
        features.append(embed(model, to_device(inputs, device)).cpu())
        targets.append(batch_targets)
    return TensorDataset(torch.cat(features), torch.cat(targets))


def make_optimizer(
    model: nn.Module, stage: StageParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over the trainable parameters, with a cosine decay over the stage's epochs."""
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=stage.lr, weight_decay=stage.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage.epochs)


def fit(
    model: nn.Module,
    train: DataLoader,
    val: DataLoader,
    stage: StageParams,
    device: torch.device,
    *,
    track: bool = True,
) -> list[dict[str, float]]:
    """Adam with a cosine learning-rate decay, validation every epoch, early stopping, the best epoch restored.

    track: log every epoch to the active MLflow run.
    """
    optimizer, scheduler = make_optimizer(model, stage)
    history: list[dict[str, float]] = []
    best_key, best_state, stale = (-1.0, 0.0), copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, stage.epochs + 1):
        desc = f"epoch {epoch}/{stage.epochs}"
        train_loss, train_acc = train_one_epoch(model, train, optimizer, device, desc, stage.label_smoothing)
        scheduler.step()
        val_loss, predictions, targets = evaluate(model, val, device)
        val_acc = float((predictions == targets).mean())
        row = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc}
        history.append(row)
        if track:
            mlflow.log_metrics(row, step=epoch)
        print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
        if (val_acc, -val_loss) > best_key:
            best_key, best_state, stale = (val_acc, -val_loss), copy.deepcopy(model.state_dict()), 0
            if track:
                mlflow.log_metric("best_epoch", epoch)
        else:
            stale += 1
            if stale >= stage.patience:
                print(f"early stop: no better validation for {stale} epochs", flush=True)
                break
    model.load_state_dict(best_state)
    return history


def data_version(processed: Path, raw_dvc: Path = Path("data/raw.dvc")) -> dict[str, str]:
    """The manifest's sha256 (exact split membership) and, when DVC tracks the raw folder, its md5."""
    version = {"data_version": sha256_file(processed / "manifest.csv")}
    if raw_dvc.is_file():
        outs = yaml.safe_load(raw_dvc.read_text()).get("outs", [{}])
        version["raw_data_md5"] = str(outs[0].get("md5", "unknown"))
    return version


def train_stage(name: str, params: Params, data_dir: Path, pretrained: str, out_dir: Path) -> dict[str, Any]:
    """Train one stage inside its own MLflow run; writes models/<name>.pt and reports/<name>.json.

    The final model is registered, with the manifest of the data it trained on, and nothing more: whether it may
    replace what production runs is decided on its exported, served file (loop/champion.py, after make export).
    """
    spec = PreprocessSpec.from_dict(params.preprocess)
    settings = params.train
    stage: StageParams = getattr(settings, name)
    seed_everything(settings.seed)
    device = pick_device()
    labels = list(spec.labels)
    evaluation = ClassificationPresetEval(spec=spec)

    def loader(split: str, transform: Callable[..., torch.Tensor], shuffle: bool = False) -> DataLoader:
        dataset = load_data(data_dir, split, spec, transform)
        return make_loader(dataset, settings.batch_size, settings.num_workers, shuffle=shuffle, seed=settings.seed)

    model = build_model(len(labels), pretrained).to(device, memory_format=torch.channels_last)
    baseline_checkpoint = out_dir / "baseline.pt"
    if name == "final" and baseline_checkpoint.is_file():  # fine-tune from the trained linear probe
        model.load_state_dict(torch.load(baseline_checkpoint, map_location=device, weights_only=False)["state_dict"])
    freeze_backbone(model, stage.unfreeze_blocks)

    lineage = {**data_version(data_dir), "git_commit": git_commit(), "pretrained": pretrained}
    if pretrained != IMAGENET:
        lineage["pretrained_sha256"] = sha256_file(Path(pretrained))
    started = time.perf_counter()
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"stage": name, **lineage})
        mlflow.log_params(
            tracking.flatten({"stage": asdict(stage), "seed": settings.seed, "batch_size": settings.batch_size,
                              "hflip_average": settings.hflip_average, "preprocess": spec.to_dict(),
                              "device": str(device), **lineage})
        )  # fmt: skip
        if name == "baseline":  # the frozen backbone runs once: the head trains on cached features
            cached = {
                split: extract_features(model, loader(split, evaluation), device, f"features {split}")
                for split in ("train", "val")
            }
            head = {s: make_loader(cached[s], settings.batch_size, 0, shuffle=s == "train", seed=settings.seed)
                    for s in cached}  # fmt: skip
            fit(model.classifier, head["train"], head["val"], stage, device)
        else:
            augment = asdict(stage.augment) if stage.augment else {}
            train = loader("train", ClassificationPresetTrain(spec=spec, **augment), shuffle=True)
            fit(model, train, loader("val", evaluation), stage, device)

        # both stages are scored as they would be exported (settings.hflip_average), and on the single view
        test = loader("test", evaluation)
        probabilities, targets = predict(Predictor(model, settings.hflip_average), test, device)
        single_view, _ = predict(Predictor(model), test, device)
        report = classification_report(targets, probabilities.argmax(1), labels)
        report["hflip_average"] = settings.hflip_average
        report["single_view_accuracy"] = float((single_view.argmax(1) == targets).mean())
        # val + test: the accuracy with its Wilson 95% interval (val picked the best epoch, so it is a little
        # optimistic)
        val_probabilities, val_targets = predict(Predictor(model, settings.hflip_average), loader("val", evaluation),
                                                 device)  # fmt: skip
        hits = np.concatenate([val_probabilities.argmax(1) == val_targets, probabilities.argmax(1) == targets])
        report["val_test_accuracy"] = proportion(int(hits.sum()), len(hits))
        report["test_accuracy_ci95"] = proportion(int((probabilities.argmax(1) == targets).sum()), len(targets))["ci95"]
        report["train_seconds"] = time.perf_counter() - started
        mlflow.log_metrics({f"test_{k}": v for k, v in report.items() if isinstance(v, float) and k != "train_seconds"})
        mlflow.log_metric("train_seconds", report["train_seconds"])
        mlflow.log_figure(
            plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, f"{name}: test"),
            "confusion_matrix.png",
        )
        mlflow.log_dict(report, "test_report.json")

        model = model.eval().to("cpu", memory_format=torch.contiguous_format)
        registered = params.mlflow.registered_model if name == "final" else None
        example = np.zeros((1, 3, spec.input_size, spec.input_size), dtype=np.float32)
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example, registered_model_name=registered,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )  # fmt: skip
        version = f"{name}-{run.info.run_id[:12]}"
        if registered:
            version = f"{registered}-v{info.registered_model_version}"
            report["registered_version"] = info.registered_model_version
            # what it trained on: the champion decision leaves out evaluation photos a production model trained on
            mlflow.log_artifact(str(data_dir / "manifest.csv"), artifact_path=str(Path(tracking.MANIFESTS[0]).parent))
        checkpoint = {
            "arch": "mobilenet_v2", "state_dict": model.state_dict(), "preprocess": spec.to_dict(),
            "model_version": version, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "stage": name, "test_accuracy": report["accuracy"], "hflip_average": settings.hflip_average, **lineage,
            "pet_head": imagenet_head_state(pretrained),  # the not-a-pet head, see training/pet.py
        }  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, out_dir / f"{name}.pt")
        report["model_version"] = version
        report["run_id"] = run.info.run_id
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    add_pretrained_argument(parser)
    parser.add_argument("--out-dir", type=Path, default=Path("models"))
    parser.add_argument("--reports-dir", type=Path, default=None, help="default: params data.reports_dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    tracking.configure(params.mlflow.experiment)
    reports = args.reports_dir or Path(params.data.reports_dir)
    for name in STAGES if args.stage == "all" else (args.stage,):
        report = train_stage(name, params, args.data or Path(params.data.processed_dir), args.pretrained, args.out_dir)
        write_json(reports / f"{name}.json", report)
        print(f"{name}: test accuracy {report['accuracy']:.4f} ({report['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
