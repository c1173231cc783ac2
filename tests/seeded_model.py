"""A real, deterministic model for tests and CI without training: the ImageNet backbone with a fixed 2-class head.

The head averages ImageNet's own classifier rows for the cat classes (281-285) and the dog breeds (151-268),
so the model really tells cats from dogs. It carries the not-a-pet head as `make export` does (ImageNet's whole
classifier, training/pet.py) with a fixed threshold near the one the real pipeline chose (CI never trains or
calibrates). `python -m tests.seeded_model OUT_DIR [WEIGHTS]` writes
OUT_DIR/model.onnx (+ model.json) through the same export code as `make export`; `--model-version V` names it
otherwise (a second release of the same weights, a different model file: make deploy-test).
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGENET_CATS = range(281, 286)
IMAGENET_DOGS = range(151, 269)
# the pipeline's choice on the development data (reports/not-a-pet.json), fixed here because CI never calibrates
SEEDED_PET_THRESHOLD = 0.05
# the mirror view's gate (server/mirror.py), fixed for the same reason: about the pipeline's, so that some test
# photos take the second view and most do not
SEEDED_MIRROR_GATE = {"confidence": 0.99, "pet_low": 0.03, "pet_high": 0.08}
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet.pt"
# Reference distributions for drift monitoring: photos the tests do not send (they use the low numbers).
REFERENCE_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cats-vs-dogs-2k"
REFERENCE_RANGE = range(901, 1001)


SEEDED_VERSION = "seeded-imagenet-head"


def seeded_checkpoint(weights: Path, model_version: str = SEEDED_VERSION) -> dict:
    """A checkpoint in the training format, made without training."""
    import torch
    import yaml

    from training.model import build_model, imagenet_head_state, load_state_dict
    from training.presets import PreprocessSpec

    imagenet = load_state_dict(weights)
    model = build_model(2, str(weights))
    weight, bias = imagenet["classifier.1.weight"], imagenet["classifier.1.bias"]
    with torch.no_grad():
        model.classifier[1].weight.copy_(torch.stack([weight[IMAGENET_CATS].mean(0), weight[IMAGENET_DOGS].mean(0)]))
        model.classifier[1].bias.copy_(torch.stack([bias[IMAGENET_CATS].mean(), bias[IMAGENET_DOGS].mean()]))
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    return {
        "arch": "mobilenet_v2",
        "state_dict": model.eval().state_dict(),
        "preprocess": PreprocessSpec.from_dict(params["preprocess"]).to_dict(),
        "model_version": model_version,
        "data_version": "none",
        "git_commit": "test",
        "hflip_average": bool(params["train"].get("hflip_average", False)),
        "pet_head": imagenet_head_state(str(weights)),
    }


def export_seeded_model(out_dir: Path, weights: Path = DEFAULT_WEIGHTS, model_version: str = SEEDED_VERSION) -> Path:
    """Write out_dir/model.onnx and its sidecar; returns the .onnx path."""
    import torch

    from export.convert import export_onnx, model_metadata, single_view, write_metadata
    from training.model import load_predictor

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "seeded.pt"
    torch.save(seeded_checkpoint(weights, model_version), checkpoint_path)
    predictor, checkpoint = load_predictor(checkpoint_path)
    path = out_dir / "model.onnx"
    export_onnx(single_view(predictor), checkpoint["preprocess"]["input_size"], path, opset=18)
    metadata = model_metadata(checkpoint, "float32")
    if predictor.hflip_average:
        metadata["mirror"] = {"gate": SEEDED_MIRROR_GATE, "rule": "fixed for the seeded test model"}
    write_metadata(path, metadata)  # the drift reference is computed as the service runs the model
    metadata["reference"] = seeded_reference(path, checkpoint["preprocess"])
    metadata["pet"].update(
        threshold=SEEDED_PET_THRESHOLD, chosen_on={"rule": "fixed for the seeded test model (tests/seeded_model.py)"}
    )
    write_metadata(path, metadata)
    return path


def seeded_reference(path: Path, preprocess: dict) -> dict:
    """The reference distributions on 100 cats and 100 dogs from the shared photos (CI has no validation split)."""
    import numpy as np
    from PIL import Image

    from export.reference import reference_for
    from training.presets import ClassificationPresetEval, PreprocessSpec

    spec = PreprocessSpec.from_dict(preprocess)
    transform = ClassificationPresetEval(spec=spec)
    inputs, targets = [], []
    for target, label in enumerate(spec.labels):
        for i in REFERENCE_RANGE:
            with Image.open(REFERENCE_PHOTOS / f"{label}s" / f"{label}.{i}.jpg") as image:
                inputs.append(transform(image.convert("RGB")).numpy())
            targets.append(target)
    source = f"shared photos {REFERENCE_RANGE.start}-{REFERENCE_RANGE.stop - 1} of each class"
    return reference_for(path, np.stack(inputs), np.asarray(targets), list(spec.labels), source)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("weights", type=Path, nargs="?", default=DEFAULT_WEIGHTS)
    parser.add_argument("--model-version", default=SEEDED_VERSION)
    args = parser.parse_args()
    print(export_seeded_model(args.out_dir, args.weights, args.model_version))
