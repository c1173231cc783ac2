"""Not a pet: is_pet and pet_score from the model's second output, the threshold and its override, the metric,
the threshold choice, and a model without the pet output still serving."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from export import synthetic
from export.not_a_pet import calibrate, choose_threshold, not_pet_files
from server.app import create_app
from server.config import Settings
from tests.conftest import WEIGHTS, photos
from tests.seeded_model import SEEDED_PET_THRESHOLD
from training.config import PetParams, load_params
from training.pet import is_wild_relative
from training.stats import paired, proportion

NOT_PETS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "not-pets-dev"
PETS = [*photos("cat", 6), *photos("dog", 6)]
GENERATED = {name: data for name, _, data in synthetic.generate(per_kind=2)}


def serve(model: Path, **overrides: object) -> TestClient:
    settings = dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, **overrides)
    return TestClient(create_app(settings))


def batch(client: TestClient, files: dict[str, bytes]) -> dict[str, dict]:
    response = client.post(
        "/predict/batch", files=[("files", (n, d, "application/octet-stream")) for n, d in files.items()]
    )
    assert response.status_code == 200, response.text
    return {item["file"]: item for item in response.json()["results"]}


@pytest.fixture(scope="module")
def client(onnx_model: Path):
    with serve(onnx_model) as test_client:
        yield test_client


def test_real_cats_and_dogs_are_pets_and_generated_non_pets_are_not(client):
    pets = batch(client, {p.name: p.read_bytes() for p in PETS})
    for item in pets.values():
        assert item["is_pet"] is True and SEEDED_PET_THRESHOLD <= item["pet_score"] <= 1, item
        assert item["label"] in ("cat", "dog")  # label and probabilities keep their meaning
    others = batch(client, GENERATED)
    for name in ("document_000.jpg", "document_001.png", "screenshot_001.png", "chart_000.jpg", "blank_000.jpg"):
        assert others[name]["is_pet"] is False and 0 <= others[name]["pet_score"] < SEEDED_PET_THRESHOLD, name
    flagged = sum(not item["is_pet"] for item in others.values())
    assert flagged >= len(others) - 1  # every kind of generated image, at most one miss


def test_predict_answers_is_pet_and_counts_not_a_pet_answers(client):
    document = GENERATED["document_000.jpg"]
    before = client.get("/metrics").text
    body = client.post("/predict", files={"file": ("doc.jpg", document, "image/jpeg")}).json()
    assert body["is_pet"] is False and isinstance(body["pet_score"], float)
    cat = client.post("/predict", files={"file": ("cat.jpg", PETS[0].read_bytes(), "image/jpeg")}).json()
    assert cat["is_pet"] is True and cat["pet_score"] > body["pet_score"]
    assert counter(client.get("/metrics").text) == counter(before) + 1


def counter(text: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith("catsdogs_not_a_pet_total ")]
    return float(lines[0].split()[1])


def test_model_reports_the_threshold_and_how_it_was_chosen(client):
    pet = client.get("/model").json()["pet"]
    assert pet["output_name"] == "pet_score"
    assert pet["threshold"] == pet["chosen_threshold"] == SEEDED_PET_THRESHOLD
    assert pet["threshold_source"] == "metadata" and pet["chosen_on"]["rule"]


def test_pet_threshold_environment_variable_overrides_the_model(onnx_model, monkeypatch):
    monkeypatch.setenv("PET_THRESHOLD", "0")
    with TestClient(create_app(dataclasses.replace(Settings.from_env(), model_path=onnx_model))) as lenient:
        assert all(item["is_pet"] for item in batch(lenient, GENERATED).values())
        pet = lenient.get("/model").json()["pet"]
        assert pet["threshold"] == 0 and pet["threshold_source"] == "PET_THRESHOLD"
        assert pet["chosen_threshold"] == SEEDED_PET_THRESHOLD
    monkeypatch.setenv("PET_THRESHOLD", "1.5")
    with pytest.raises(ValueError, match="PET_THRESHOLD"):
        Settings.from_env()
    monkeypatch.setenv("PET_THRESHOLD", "half")
    with pytest.raises(ValueError, match="PET_THRESHOLD"):
        Settings.from_env()


@pytest.fixture(scope="module")
def model_without_pet_output(tmp_path_factory) -> Path:
    """A model exported the way models were before the pet output (checkpoint without a pet head)."""
    from export.convert import export_onnx, model_metadata, write_metadata
    from tests.seeded_model import seeded_checkpoint
    from training.model import load_predictor

    out = tmp_path_factory.mktemp("old")
    checkpoint = seeded_checkpoint(WEIGHTS)
    del checkpoint["pet_head"]
    torch.save(checkpoint, out / "old.pt")
    predictor, checkpoint = load_predictor(out / "old.pt")
    path = out / "model.onnx"
    export_onnx(predictor, 224, path, opset=18)
    metadata = model_metadata(checkpoint, "float32")
    del metadata["pet"]  # as old exports wrote it
    write_metadata(path, metadata)
    return path


def test_a_model_without_the_pet_output_still_serves(model_without_pet_output):
    with serve(model_without_pet_output) as old:
        body = old.post("/predict", files={"file": ("cat.jpg", PETS[0].read_bytes(), "image/jpeg")}).json()
        assert body["label"] == "cat" and body["is_pet"] is None and body["pet_score"] is None
        assert old.get("/model").json()["pet"] is None
        assert counter(old.get("/metrics").text) == 0


def test_threshold_keeps_the_target_share_of_development_pets():
    scores = np.linspace(0.001, 1, 1000)
    threshold = choose_threshold(scores, keep_target=0.998)
    assert (scores >= threshold).mean() >= 0.998 and (scores >= np.nextafter(threshold, 1)).mean() < 0.998


def test_not_pets_are_split_by_class_index_and_never_overlap():
    split = not_pet_files(NOT_PETS)
    assert len(split["dev"]) + len(split["held_out"]) == 439
    assert all(int(f.name.split("_")[1]) % 4 == 0 for f in split["dev"])
    assert not {f.name for f in split["dev"]} & {f.name for f in split["held_out"]}


def test_audited_pet_photos_are_set_apart_from_both_not_pet_sets():
    shows_pet = load_params().pet.shows_pet
    split = not_pet_files(NOT_PETS, shows_pet)
    assert sorted(f.name for f in split["shows_pet"]) == sorted(shows_pet) and shows_pet
    assert len(split["dev"]) + len(split["held_out"]) + len(split["shows_pet"]) == 439
    assert not {f.name for f in split["dev"] + split["held_out"]} & set(shows_pet)


def test_wild_relatives_are_the_wild_dog_and_cat_families():
    names = {f.name for f in NOT_PETS.iterdir() if is_wild_relative(f)}
    assert {"imagenet_270_white_wolf.jpg", "imagenet_278_kit_fox.jpg", "imagenet_292_tiger.jpg"} <= names
    assert all(269 <= int(n.split("_")[1]) <= 293 for n in names)
    edges = {268: False, 269: True, 280: True, 281: False, 285: False, 286: True, 293: True, 294: False}
    assert {i: is_wild_relative(Path(f"imagenet_{i}_x.jpg")) for i in edges} == edges
    assert not is_wild_relative(Path("wolf.jpg"))


def test_generated_images_are_deterministic_and_cover_every_kind():
    again = {name: data for name, _, data in synthetic.generate(per_kind=2)}
    assert again == GENERATED and len(GENERATED) == 2 * len(synthetic.KINDS)


def test_intervals_state_the_noise_of_small_samples():
    assert proportion(191, 195)["ci95"][0] < 0.95 < proportion(191, 195)["ci95"][1]  # 195 photos: +-2 points
    same = paired(np.ones(376, bool), np.ones(376, bool))
    assert same["difference"] == 0 and 0 < same["max_loss_upper95"] < 0.01  # zero flips still bound the loss
    one_better = paired(np.r_[np.ones(370), np.zeros(6)], np.r_[np.ones(372), np.zeros(4)])
    assert one_better["only_candidate_right"] == 2 and one_better["mcnemar_p"] > 0.05  # two photos: noise


def test_the_threshold_is_chosen_without_the_not_pet_folder(onnx_model, tmp_path):
    data = tmp_path / "processed"
    for split, start in (("train", 1), ("val", 4), ("test", 7)):
        for label in ("cat", "dog"):
            (data / split / label).mkdir(parents=True)
            for photo in photos(label, 3, start=start):
                shutil.copyfile(photo, data / split / label / photo.name)
    settings = PetParams(not_pets_dir=str(tmp_path / "absent"), keep_target=0.99, synthetic_per_kind=1)
    metadata, report, sets = calibrate(onnx_model, data, settings)
    assert 0 < metadata["threshold"] <= 1
    assert list(sets) == ["held out: test pets vs generated non-ImageNet"]
    assert set(report["at_threshold"]) == set(sets)
