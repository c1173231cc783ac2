"""CI's torch-vs-ONNX parity: the model, the preprocessing, and the server's whole code path, on real photos."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.evaluate import make_session, outputs, read_metadata
from server.mirror import MirrorGate
from server.model import Model
from server.preprocess import Preprocessor
from tests.conftest import AWKWARD, DATASET, LARGE, WEIGHTS, photos
from tests.images import encode, transparent_png
from training.config import SplitParams
from training.data import SPLITS, prepare
from training.model import Predictor, load_predictor
from training.presets import ClassificationPresetEval, ImageLoader, PreprocessSpec
from training.train import load_data

PHOTOS = [*photos("cat", 20), *photos("dog", 20)]  # 40 real photos
MADE = {  # made from real photos: transparency, and a PNG large enough to be box-reduced before the resize
    "cats/see-through.png": lambda: transparent_png("cats/cat.3.jpg"),
    "dogs/large.png": lambda: encode(Image.open(DATASET / LARGE).convert("RGB").resize((2048, 1152)), "PNG"),
}
SOURCES = [*(f"{p.parent.name}/{p.name}" for p in PHOTOS[:32]), *AWKWARD, *MADE]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The seeded model exported by the production export code, and its PyTorch original."""
    from tests.seeded_model import export_seeded_model

    path = export_seeded_model(tmp_path_factory.mktemp("parity"), WEIGHTS)
    predictor, checkpoint = load_predictor(path.parent / "seeded.pt")
    return path, predictor, PreprocessSpec.from_dict(checkpoint["preprocess"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, exported) -> tuple[Path, dict[str, torch.Tensor]]:
    """The raw folder, and what training reads from it: prepare stage, then training's own load_data."""
    _, _, spec = exported
    root = tmp_path_factory.mktemp("prepared")
    for source in SOURCES:
        (root / "raw" / source).parent.mkdir(parents=True, exist_ok=True)
        if source in MADE:
            (root / "raw" / source).write_bytes(MADE[source]())
        else:
            shutil.copyfile(DATASET / source, root / "raw" / source)
    processed = root / "processed"
    prepare(root / "raw", processed, root / "reports", labels=spec.labels, fractions=SplitParams(0.5, 0.25, 0.25),
            salt="parity", preprocess=spec.to_dict())  # fmt: skip
    with open(processed / "manifest.csv") as handle:
        source_of = {row["file"]: row["source"] for row in csv.DictReader(handle)}
    read: dict[str, torch.Tensor] = {}
    for split in SPLITS:
        dataset = load_data(processed, split, spec, ClassificationPresetEval(spec=spec))
        for index, (path, _) in enumerate(dataset.samples):
            read[source_of[Path(path).relative_to(processed).as_posix()]] = dataset[index][0]
    assert set(read) == set(SOURCES)
    return root / "raw", read


def torch_inputs(spec: PreprocessSpec, files: list[Path]) -> torch.Tensor:
    """The training evaluation transform on files read by training's loader, exactly as training and export do."""
    transform, load = ClassificationPresetEval(spec=spec), ImageLoader(spec=spec)
    return torch.stack([transform(load(f)) for f in files])


def torch_views(predictor: Predictor, inputs: torch.Tensor) -> tuple[np.ndarray, ...]:
    """PyTorch's single view and its mirror image: probabilities and pet scores of each."""
    single = Predictor(predictor.model, pet_head=predictor.pet_head).eval()
    with torch.inference_mode():
        (plain, plain_pet), (mirrored, mirrored_pet) = single(inputs), single(inputs.flip(3))
    return plain.numpy(), plain_pet.numpy(), mirrored.numpy(), mirrored_pet.numpy()


@pytest.mark.parametrize("batch_size", [1, 8])
def test_onnxruntime_matches_pytorch_probabilities(exported, batch_size):
    """The graph is one view: equal to PyTorch's single view, at batch sizes other than the export's."""
    path, model, spec = exported
    inputs = torch_inputs(spec, PHOTOS)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    expected, expected_pet, _, _ = torch_views(model, inputs)
    pet_scores = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        actual, actual_pet = session.run(["probabilities", "pet_score"], {name: batch.numpy()})
        np.testing.assert_allclose(actual, expected[start : start + batch_size], rtol=0, atol=1e-5)
        assert (actual.argmax(1) == expected[start : start + batch_size].argmax(1)).all()
        assert actual_pet.shape == (len(batch),)
        np.testing.assert_allclose(actual_pet, expected_pet[start : start + batch_size], rtol=0, atol=1e-5)
        pet_scores.extend(actual_pet)
    assert min(pet_scores) > 0.05  # real cats and dogs: the pet head sees pets


@pytest.mark.parametrize("batch_size", [1, 8])
def test_the_mirror_view_averages_exactly_the_photos_its_gate_names(exported, batch_size):
    """server.mirror on the ONNX model against PyTorch's two views: averaged where the gate says, else the single
    view, photo by photo whatever the batch, and both kinds present among the real photos."""
    path, predictor, spec = exported
    assert predictor.hflip_average and json.loads(path.with_suffix(".json").read_text())["hflip_average"]
    inputs = torch_inputs(spec, PHOTOS)
    plain, plain_pet, mirrored, mirrored_pet = torch_views(predictor, inputs)
    assert np.abs(plain - mirrored).max() > 1e-3  # the two views really differ, so the average is visible
    gate = MirrorGate.from_metadata(read_metadata(path))
    need = gate.needs(plain, plain_pet)
    assert 0 < need.sum() < len(need), need  # some photos take the second view, most do not
    expected = np.where(need[:, None], (plain + mirrored) / 2, plain)
    expected_pet = np.where(need, (plain_pet + mirrored_pet) / 2, plain_pet)
    served = outputs(make_session(path), inputs.numpy(), batch_size=batch_size)
    np.testing.assert_allclose(served["probabilities"], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(served["pet_score"], expected_pet, rtol=0, atol=1e-5)
    with torch.inference_mode():
        averaged, averaged_pet = (output.numpy() for output in predictor(inputs))  # PyTorch's flip averaging
    np.testing.assert_allclose(expected[need], averaged[need], rtol=0, atol=1e-5)
    np.testing.assert_allclose(expected_pet[need], averaged_pet[need], rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_serving_preprocessing_equals_what_training_reads(exported, prepared, source):
    """The upload's bytes through the server against the prepared file through training's load_data."""
    _, _, spec = exported
    raw, training_read = prepared
    served = Preprocessor(spec.to_dict(), max_pixels=50_000_000)((raw / source).read_bytes())
    np.testing.assert_allclose(served, training_read[source].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_parity_holds_with_and_without_jpeg_draft(exported, jpeg_draft):
    _, _, spec = exported
    spec = PreprocessSpec.from_dict({**spec.to_dict(), "jpeg_draft": jpeg_draft})
    large = DATASET / "cats" / "cat.90008.jpg"
    served = Preprocessor(spec.to_dict(), max_pixels=50_000_000)(large.read_bytes())
    np.testing.assert_allclose(served, torch_inputs(spec, [large])[0].numpy(), rtol=0, atol=1e-5)


def test_server_code_path_matches_pytorch_end_to_end(exported):
    path, model, spec = exported
    served = Model(path, threads=1, max_pixels=50_000_000)
    files = PHOTOS[::4] + [DATASET / a for a in AWKWARD]
    plain, plain_pet, mirrored, mirrored_pet = torch_views(model, torch_inputs(spec, files))
    need = served.mirror.needs(plain, plain_pet)  # the gate on PyTorch's first view, as the service applies it
    expected = np.where(need[:, None], (plain + mirrored) / 2, plain)
    expected_pet = np.where(need, (plain_pet + mirrored_pet) / 2, plain_pet)
    for file, reference, pet in zip(files, expected, expected_pet, strict=True):
        prediction = served.classify(file.read_bytes())
        actual = np.array([prediction.probabilities[label] for label in spec.labels])
        np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-4, err_msg=file.name)
        assert prediction.label == spec.labels[int(reference.argmax())]
        assert prediction.pet_score == pytest.approx(float(pet), abs=1e-4)
        assert prediction.is_pet is (float(pet) >= served.pet_threshold)
