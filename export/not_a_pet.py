"""The not-a-pet threshold: chosen on development data, checked on data it was never tuned on, with the curve.

Development (the threshold is chosen here): the train and val photos of the prepared cats and dogs, and the
not-pet images whose ImageNet class index is a multiple of 4. Held out (never used to choose anything): the
test photos, the other not-pet images (index 2 mod 4), and the generated images ImageNet never had
(export/synthetic.py). Every image goes through the service's own code path (server.model.Model).

`python -m export.not_a_pet` re-scores an exported model and rewrites the report without changing the model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from export import synthetic
from imaging import DEFAULT_MAX_PIXELS, ImageError
from server.model import Model
from training.config import DEFAULT_PARAMS, PetParams, load_params
from training.pet import is_wild_relative, not_pet_files, pet_files
from training.stats import proportion
from training.utils import write_json

matplotlib.use("Agg")
from matplotlib import pyplot as plt

METHOD = (
    "ImageNet 1000-class head of the same backbone as a second output: pet_score = its softmax mass on the "
    "domestic dogs (151-268) and cats (281-285), averaged over the same views as the label"
)


def pet_scores(model: Model, images: Sequence[bytes], batch_size: int = 32) -> np.ndarray:
    """Each image's pet_score through the service's own path (decode, preprocess, one session.run per batch)."""
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        results, _ = model.classify_all(list(images[start : start + batch_size]))
        scores.extend(float("nan") if isinstance(r, ImageError) else float(r.pet_score) for r in results)
    values = np.asarray(scores)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} images could not be scored (undecodable)")
    return values


def choose_threshold(pets: np.ndarray, keep_target: float) -> float:
    """The highest threshold that keeps at least keep_target of the development pets (score >= threshold)."""
    allowed_misses = int(np.floor((1 - keep_target) * len(pets) + 1e-9))
    return float(np.sort(pets)[allowed_misses])


def flagged(others: np.ndarray, threshold: float) -> dict[str, Any]:
    """Non-pets flagged (score below the threshold), with the Wilson 95% interval."""
    return proportion(int((others < threshold).sum()), len(others))


def rates(pets: np.ndarray, others: np.ndarray, threshold: float) -> dict[str, Any]:
    """Kept pets and flagged non-pets at a threshold, with Wilson 95% intervals."""
    return {
        "kept_pets": proportion(int((pets >= threshold).sum()), len(pets)),
        "flagged_not_pets": flagged(others, threshold),
    }


def curve(pets: np.ndarray, others: np.ndarray) -> list[dict[str, float]]:
    """The trade-off: kept pets vs flagged non-pets at thresholds spread over the scores' range."""
    thresholds = np.unique(np.concatenate([np.geomspace(1e-4, 1, 81), np.linspace(0, 1, 101)]))
    return [
        {
            "threshold": float(t),
            "kept_pets": float((pets >= t).mean()),
            "flagged_not_pets": float((others < t).mean()),
        }
        for t in thresholds
    ]


def plot(sets: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, path: Path) -> None:
    """Flagged non-pets vs kept pets for every evaluation set, the chosen threshold marked on each."""
    figure, axis = plt.subplots(figsize=(7, 5))
    for name, (pets, others) in sets.items():
        points = curve(pets, others)
        (line,) = axis.plot([p["flagged_not_pets"] for p in points], [p["kept_pets"] for p in points], label=name)
        chosen = rates(pets, others, threshold)
        axis.plot(chosen["flagged_not_pets"]["rate"], chosen["kept_pets"]["rate"], "o", color=line.get_color())
    axis.axhline(0.997, color="grey", linestyle=":", linewidth=1)
    axis.axvline(0.98, color="grey", linestyle=":", linewidth=1)
    axis.set_xlim(0.8, 1.0)
    axis.set_ylim(0.95, 1.001)
    axis.set_xlabel("non-pet images flagged (is_pet false)")
    axis.set_ylabel("cat and dog photos kept (is_pet true)")
    axis.set_title(f"not-a-pet trade-off (dots: threshold {threshold:.4g}; goal: top right of the dotted lines)")
    axis.legend(loc="lower left", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_all(files: Sequence[Path]) -> list[bytes]:
    return [file.read_bytes() for file in files]


def not_pet_sets(settings: PetParams) -> dict[str, list[Path]]:
    """The not-pet images: development, held out, and the audited ones that show a pet; none when the folder is
    missing (the threshold rule reads only the pets; the ImageNet non-pets are reported when present)."""
    not_pets_dir = Path(settings.not_pets_dir)
    if not_pets_dir.is_dir():
        return not_pet_files(not_pets_dir, settings.shows_pet)
    print(f"warning: no not-pet images at {not_pets_dir} (pet.not_pets_dir): their rates are not reported")
    return {"dev": [], "held_out": [], "shows_pet": []}


def calibrate(
    model_path: Path, data_dir: Path, settings: PetParams
) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Score every set, choose the threshold on development data, and evaluate it on the held-out sets.

    Returns the metadata block for the model, the report, and the held-out scores (for the plot).
    """
    not_pets_dir, keep_target = Path(settings.not_pets_dir), settings.keep_target
    model = Model(model_path, threads=0, max_pixels=DEFAULT_MAX_PIXELS, pet_threshold=0.5)  # chosen below
    not_pets = not_pet_sets(settings)
    generated = synthetic.generate(settings.synthetic_per_kind)
    scores = {
        "dev_pets": pet_scores(model, read_all(pet_files(data_dir, ("train", "val")))),
        "dev_not_pets": pet_scores(model, read_all(not_pets["dev"])),
        "test_pets": pet_scores(model, read_all(pet_files(data_dir, ("test",)))),
        "held_out_not_pets": pet_scores(model, read_all(not_pets["held_out"])),
        "generated": pet_scores(model, [data for _, _, data in generated]),
        "shows_pet": pet_scores(model, read_all(not_pets["shows_pet"])),
    }
    relatives = np.array([is_wild_relative(f) for f in not_pets["held_out"]], dtype=bool)
    threshold = choose_threshold(scores["dev_pets"], keep_target)
    kinds = np.array([kind for _, kind, _ in generated])
    sets = {
        "dev: train+val pets vs ImageNet not-pets (0 mod 4)": (scores["dev_pets"], scores["dev_not_pets"]),
        "held out: test pets vs ImageNet not-pets (2 mod 4)": (scores["test_pets"], scores["held_out_not_pets"]),
        "held out: test pets vs generated non-ImageNet": (scores["test_pets"], scores["generated"]),
    }
    sets = {name: (pets, others) for name, (pets, others) in sets.items() if len(others)}
    chosen_on = {
        "pets": f"{data_dir}/train + {data_dir}/val ({len(scores['dev_pets'])} photos)",
        "not_pets": f"{not_pets_dir}, ImageNet class index 0 mod 4 ({len(scores['dev_not_pets'])} images, "
        "pet.shows_pet set apart)",
        "rule": f"highest threshold keeping >= {keep_target} of the development pets",
        "keep_target": keep_target,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }
    metadata = {"threshold": threshold, "method": METHOD, "chosen_on": chosen_on}
    report = {
        "model_version": model.version,
        "method": METHOD,
        "threshold": threshold,
        "chosen_on": chosen_on,
        "goal": {"flagged_not_pets": 0.98, "kept_pets": 0.997},
        "at_threshold": {name: rates(pets, others, threshold) for name, (pets, others) in sets.items()},
        "generated_by_kind": {kind: flagged(scores["generated"][kinds == kind], threshold) for kind in synthetic.KINDS},
        "curves": {name: curve(pets, others) for name, (pets, others) in sets.items()},
        "shows_pet": {
            "files": list(settings.shows_pet),
            "called_pet": {
                f.name: bool(s >= threshold) for f, s in zip(not_pets["shows_pet"], scores["shows_pet"], strict=True)
            },
        },
        "lowest_dev_pet_scores": [float(s) for s in np.sort(scores["dev_pets"])[:10]],
    }
    if relatives.size:  # the nearest non-pets apart from the rest
        report["held_out_imagenet_by_family"] = {
            "wild dog and cat family (ImageNet 269-280, 286-293)": flagged(
                scores["held_out_not_pets"][relatives], threshold
            ),
            "everything else": flagged(scores["held_out_not_pets"][~relatives], threshold),
        }
    return metadata, report, sets


def publish(
    report: dict[str, Any], sets: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, run_id: str | None
) -> Path:
    """reports/not-a-pet.json and its PNG curve; both logged to the model's MLflow run when it has one."""
    write_json(out, report)
    figure = out.with_suffix(".png")
    plot(sets, report["threshold"], figure)
    if run_id:
        import mlflow

        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.log_artifact(str(out), artifact_path="not-a-pet")
                mlflow.log_artifact(str(figure), artifact_path="not-a-pet")
                mlflow.log_metric("pet_threshold", report["threshold"])
                for name, at in report["at_threshold"].items():
                    key = re.sub(r"[^a-z0-9]+", "_", name.split(":")[0] + " " + name.split(" vs ")[-1])[:60]
                    mlflow.log_metric(f"pet_{key}_flagged", at["flagged_not_pets"]["rate"])
                    mlflow.log_metric(f"pet_{key}_kept", at["kept_pets"]["rate"])
        except mlflow.exceptions.MlflowException as error:
            print(f"warning: could not log the not-a-pet curve to MLflow run {run_id}: {error}")
    return figure


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--out", type=Path, default=Path("reports/not-a-pet.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    _, report, sets = calibrate(args.model, args.data or Path(params.data.processed_dir), params.pet)
    publish(report, sets, args.out, None)
    print(json.dumps({"threshold": report["threshold"], **report["at_threshold"]}, indent=2))


if __name__ == "__main__":
    main()
