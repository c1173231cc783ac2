"""make retrain: harvested photos to training or the recent set by a stable hash, the original evaluation photos
frozen, and the challenger decided against what production runs by the one champion rule (loop/champion.py:
params.yaml's gates, not worse on every measure, better on one set)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from export.answers import Answers
from loop.champion import decide, labelled_files, production_version, settle
from loop.retrain import RECENT, Rule, assemble, is_recent
from tests.conftest import DATASET, ROOT, SHARED, photos
from training import tracking
from training.config import load_params
from training.data import prepare

RULE = Rule.from_params(ROOT / "params.yaml")
NOT_PETS = [path.read_bytes() for path in sorted((SHARED / "datasets" / "not-pets-dev").glob("*.jpg"))[:8]]
SPLIT = load_params(ROOT / "params.yaml").data.split


def outcomes(both: int, only_reference: int, only_candidate: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference right, candidate right) photo by photo for a paired 2x2 table."""
    reference = [True] * both + [True] * only_reference + [False] * only_candidate + [False] * neither
    candidate = [True] * both + [False] * only_reference + [True] * only_candidate + [False] * neither
    return np.array(reference), np.array(candidate)


def answers(table: tuple[int, int, int, int], pets: tuple[int, int, int, int] | None = None) -> tuple[Answers, Answers]:
    """(champion, challenger) answers: `table` the photos' paired right/wrong counts, `pets` the pooled non-pets'
    flagged counts (default: 645 non-pets, 630 flagged by both); every photo kept as a pet by both."""
    right = outcomes(*table)
    flagged = outcomes(*(pets or (630, 0, 0, 15)))
    kept = np.ones(len(right[0]), bool)
    return Answers(right[0], kept, flagged[0]), Answers(right[1], kept, flagged[1])


def test_the_rule_promotes_only_a_challenger_not_worse_on_every_measure_and_better_on_one_set():
    same = (3900, 5, 5, 90)  # original photos: no change
    better_recent = (1800, 2, 40, 158)  # recent photos: 38 more right
    promoted = decide({"original": answers(same), "recent": answers(better_recent)}, RULE.gates)
    assert promoted["promoted"], promoted["reason"]
    evaluations = promoted["evaluations"]
    assert evaluations["accuracy: recent"]["better"] and not evaluations["accuracy: original"]["better"]
    assert set(evaluations) == {"accuracy: original", "accuracy: recent", "pets kept: original + recent",
                                "non-pets flagged: pooled non-pets"}  # fmt: skip

    not_better = decide({"original": answers(same), "recent": answers((1800, 5, 5, 190))}, RULE.gates)
    assert not not_better["promoted"] and "not better" in not_better["reason"]

    worse_original = decide({"original": answers((3900, 60, 5, 35)), "recent": answers(better_recent)}, RULE.gates)
    assert not worse_original["promoted"] and "not worse on accuracy: original" in worse_original["reason"]

    # better on cat/dog photos but 20 more non-pets called pets: refused on the pet measure
    missed_pets = {"original": answers(same, (610, 20, 0, 15)), "recent": answers(better_recent)}
    refused = decide(missed_pets, RULE.gates)
    assert not refused["promoted"] and "non-pets flagged" in refused["reason"]

    # 376 evaluation photos (the 2,000-photo data has 400): even losing nothing cannot show it is within 1%
    few = decide({"original": answers((371, 0, 0, 5)), "recent": answers((30, 0, 12, 0))}, RULE.gates)
    assert not few["promoted"] and few["evaluations"]["accuracy: recent"]["better"]
    original = few["evaluations"]["accuracy: original"]
    assert original["lower95"] < -original["margin"] and original["images_needed_if_all_agree"] > 376

    champion, challenger = answers(better_recent)  # better on photos, but it lost the not-a-pet output
    no_pet = decide(
        {"original": answers(same), "recent": (champion, Answers(challenger.right, None, None))}, RULE.gates
    )
    assert not no_pet["promoted"] and "pets kept: original + recent (no images)" in no_pet["reason"]

    empty = decide({"original": answers(same), "recent": answers((0, 0, 0, 0))}, RULE.gates)
    assert not empty["promoted"] and "accuracy: recent (no images)" in empty["reason"]


def test_a_harvested_photo_stays_on_its_side_whatever_else_is_harvested():
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    sides = [is_recent(d, RULE.recent_share, RULE.recent_salt) for d in digests]
    assert abs(np.mean(sides) - RULE.recent_share) < 0.01
    assert sides == [is_recent(d, RULE.recent_share, RULE.recent_salt) for d in reversed(digests)][::-1]
    assert sides != [is_recent(d, RULE.recent_share, "another-salt") for d in digests]


def test_assembly_adds_harvested_photos_to_training_or_recent_and_freezes_the_evaluation_photos(make_raw, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    processed = tmp_path / "processed"
    prepare(make_raw(per_class=10), processed, tmp_path / "reports", labels=("cat", "dog"), fractions=SPLIT,
            salt=params["data"]["split_salt"], preprocess=params["preprocess"])  # fmt: skip
    feedback = tmp_path / "feedback"

    def harvested(photo: Path, label: str) -> str:
        data = photo.read_bytes()
        name = hashlib.sha256(data).hexdigest()
        (feedback / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, feedback / label / f"{name}.jpg")
        return name

    new = {harvested(p, p.parent.name[:-1]): p.parent.name[:-1] for p in photos("cat", 15, 20) + photos("dog", 15, 20)}
    harvested(photos("cat", 1)[0], "cat")  # one of the original photos
    twice = harvested(photos("dog", 1, 40)[0], "dog")
    harvested(photos("dog", 1, 40)[0], "cat")  # the same photo under both labels
    harvested(DATASET / "dogs" / "dog.90002.jpg", "dog")  # truncated: does not decode
    (feedback / "horse").mkdir()
    shutil.copyfile(photos("cat", 1, 60)[0], feedback / "horse" / "x.jpg")

    out = tmp_path / "assembled"
    assembly = assemble(processed, feedback, out, ("cat", "dog"), RULE, params["preprocess"])
    truncated = "the image is corrupt or truncated: image file is truncated (82 bytes not processed)"
    assert assembly.summary()["left_out"] == {
        "identical to a photo of the original data": 1, "filed under more than one label": 2,
        "folder horse is none of the labels ['cat', 'dog']": 1, truncated: 1,
    }  # fmt: skip
    assert twice not in {row["sha256"] for row in rows(out)}
    with (processed / "manifest.csv").open() as handle:
        original = list(csv.DictReader(handle))
    assembled = rows(out)
    assert assembled[: len(original)] == original  # the original data as it was, evaluation photos included
    added = {row["sha256"]: row for row in assembled[len(original) :]}
    assert set(added) == set(new)
    for digest, row in added.items():
        assert row["label"] == new[digest]
        assert row["split"] == ("recent" if is_recent(digest, RULE.recent_share, RULE.recent_salt) else "train")
        assert (out / row["file"]).read_bytes() == (feedback / new[digest] / f"{digest}.jpg").read_bytes()
    assert {"train", "recent"} == {row["split"] for row in added.values()}
    for split in ("val", "test"):  # nothing harvested reaches an evaluation split
        assert sorted(p.name for p in (out / split).rglob("*.*")) == sorted(
            Path(r["file"]).name for r in original if r["split"] == split
        )


def rows(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


NAME = "catsdogs-test"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fresh MLflow store with the registered model, the working directory its artifacts go to."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    tracking.configure("retrain-test")
    client = MlflowClient()
    client.create_registered_model(NAME)
    yield client
    mlflow.end_run()


def register(client: MlflowClient, model: Path | None, manifest: Path | None = None) -> str:
    """A run holding `model` where make export logs it (onnx/), registered; its version."""
    with mlflow.start_run() as run:
        if model is not None:
            mlflow.log_artifact(str(model), artifact_path="onnx")
        if manifest is not None:
            mlflow.log_artifact(str(manifest), artifact_path=str(Path(tracking.MANIFESTS[0]).parent))
    return str(client.create_model_version(NAME, f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id).version)


@pytest.fixture
def evaluation_data(tmp_path) -> Path:
    """val/, test/ and recent/ folders of real photos, as make retrain assembles them."""
    root = tmp_path / "data"
    for split, start in (("val", 1), ("test", 4), (RECENT, 7)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for photo in photos(label, 3, start):
                shutil.copyfile(photo, root / split / label / photo.name)
    return root


def decide_against(production: str | None, version: str, model: Path, data: Path, work: Path, **options):
    """make retrain's decision: the original evaluation photos and the recent ones, `version` against `production`."""
    sets = {"original": labelled_files(data, ("val", "test"), ("cat", "dog")),
            RECENT: labelled_files(data, (RECENT,), ("cat", "dog"))}  # fmt: skip
    return settle(NAME, version, model, sets, ("cat", "dog"), RULE.gates, NOT_PETS, work, production=production,
                  **options)  # fmt: skip


def decision_tags(client: MlflowClient, version: str) -> dict[str, str]:
    tags = client.get_model_version(NAME, version).tags
    return {key: tags.get(key) for key in ("decision", "decided_against")}


def test_without_a_production_model_the_challenger_is_refused_unless_bootstrapped(
    registry, onnx_model, evaluation_data, tmp_path
):
    """No production model: nothing to be shown not worse than, so no silent pass; --bootstrap makes the first
    candidate explicitly, and is refused once a production model exists."""
    version = register(registry, onnx_model)
    assert production_version(registry, NAME, None, "champion") is None
    refused = decide_against(None, version, onnx_model, evaluation_data, tmp_path / "w")
    assert not refused["decision"]["promoted"] and refused["candidate"] is None
    assert "--bootstrap" in refused["decision"]["reason"] and "docs/gates.md" in refused["decision"]["reason"]
    assert "candidate" not in registry.get_registered_model(NAME).aliases
    assert decision_tags(registry, version) == {"decision": "refused", "decided_against": "none"}

    settled = decide_against(None, version, onnx_model, evaluation_data, tmp_path / "w", bootstrap=True)
    assert settled["decision"]["promoted"] and settled["candidate"] == version
    assert settled["decision"]["reason"].startswith("bootstrap")
    assert str(registry.get_model_version_by_alias(NAME, "candidate").version) == version
    assert decision_tags(registry, version) == {"decision": "candidate", "decided_against": "none"}
    assert "champion" not in registry.get_registered_model(NAME).aliases  # CD moves it, once deployed

    registry.set_registered_model_alias(NAME, "champion", version)  # deployed: production runs it
    with pytest.raises(SystemExit, match="--bootstrap is only for the first model"):
        production_version(registry, NAME, None, "champion", bootstrap=True)


def test_a_challenger_no_better_than_production_is_not_a_candidate(registry, onnx_model, evaluation_data, tmp_path):
    production = register(registry, onnx_model)
    registry.set_registered_model_alias(NAME, "champion", production)
    challenger = register(registry, onnx_model)
    settled = decide_against(production_version(registry, NAME, None, "champion"), challenger, onnx_model,
                             evaluation_data, tmp_path / "w")  # fmt: skip
    decision = settled["decision"]
    assert not decision["promoted"] and settled["candidate"] is None and settled["production"]["version"] == production
    assert decision["evaluated"] == {"original": 12, "recent": 6}
    for name in ("original", "recent"):  # the same model: the same answers, no better
        evaluation = decision["evaluations"][f"accuracy: {name}"]
        assert evaluation["n"] == decision["evaluated"][name] and evaluation["difference"] == 0
    assert decision["evaluations"]["non-pets flagged: pooled non-pets"]["n"] == len(NOT_PETS)
    assert decision["evaluations"]["pets kept: original + recent"]["n"] == 18
    assert str(registry.get_model_version_by_alias(NAME, "champion").version) == production
    assert decision_tags(registry, challenger) == {"decision": "refused", "decided_against": production}


def test_the_decision_is_against_what_production_runs_not_a_lagging_champion_alias(
    registry, onnx_model, evaluation_data, tmp_path
):
    """The champion alias lags production after a failed --follow or a rollback by hand: --production VERSION (a
    release's model_version) names what production runs, and the decision records it."""
    lagging = register(registry, onnx_model)
    registry.set_registered_model_alias(NAME, "champion", lagging)
    running = register(registry, onnx_model)
    challenger = register(registry, onnx_model)
    production = production_version(registry, NAME, f"{NAME}-v{running}", "champion")
    assert production == running != lagging
    settled = decide_against(production, challenger, onnx_model, evaluation_data, tmp_path / "w")
    assert settled["production"]["version"] == settled["decided_against"] == running
    assert decision_tags(registry, challenger) == {"decision": "refused", "decided_against": running}
    assert production_version(registry, NAME, "none", "champion") is None  # production runs nothing: said so
    with pytest.raises(Exception, match=r"(?i)not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        production_version(registry, NAME, "9", "champion")  # no such version: an error, never "no production"


def test_an_unreadable_production_model_is_an_error_not_a_missing_one(registry, onnx_model, evaluation_data, tmp_path):
    production = register(registry, None)  # its run has no model file
    registry.set_registered_model_alias(NAME, "champion", production)
    challenger = register(registry, onnx_model)
    with pytest.raises(Exception):  # noqa: B017 - whatever MLflow raises, as long as nothing is promoted
        decide_against(production, challenger, onnx_model, evaluation_data, tmp_path / "w")
    assert "candidate" not in registry.get_registered_model(NAME).aliases


def test_a_challenger_whose_export_did_not_reach_the_registry_is_not_decided(registry, onnx_model, evaluation_data,
                                                                             tmp_path):  # fmt: skip
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_model.read_bytes() + b"\0")  # not the file the registry holds
    version = register(registry, onnx_model)
    with pytest.raises(SystemExit, match="did not reach MLflow"):
        decide_against(None, version, other, evaluation_data, tmp_path / "w", bootstrap=True)
    assert not registry.get_registered_model(NAME).aliases


def test_photos_the_production_model_trained_on_are_not_used_to_judge_it(registry, onnx_model, evaluation_data,
                                                                         tmp_path):  # fmt: skip
    seen = sorted((evaluation_data / RECENT / "dog").iterdir())[0]
    manifest = tmp_path / "manifest.csv"
    digest = hashlib.sha256(seen.read_bytes()).hexdigest()
    manifest.write_text(f"file,source,sha256,label,split\ntrain/dog/x.jpg,feedback/dog/x.jpg,{digest},dog,train\n")
    production = register(registry, onnx_model, manifest)
    challenger = register(registry, onnx_model)
    decision = decide_against(production, challenger, onnx_model, evaluation_data, tmp_path / "w")["decision"]
    assert decision["excluded_production_trained_on"] == {"original": [], RECENT: [seen.name]}
    assert decision["evaluated"]["recent"] == decision["evaluations"]["accuracy: recent"]["n"] == 5
