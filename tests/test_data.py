from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from imaging import Decoder
from tests.conftest import AWKWARD, CMYK, DATASET, EXIF_ROTATED, GRAYSCALE, PROBLEM_FILES, RGBA_PNG, ROOT, photos
from tests.images import flat_png, transparent_png
from training.config import SplitParams, load_params
from training.data import assign_split, infer_label, prepare
from training.presets import ImageLoader, PreprocessSpec
from training.utils import sha256_file

LABELS = ("cat", "dog")
SPLIT = SplitParams(train=0.8, val=0.1, test=0.1)
PREPROCESS = load_params(ROOT / "params.yaml").preprocess


def run_prepare(
    raw: Path, tmp_path: Path, tag: str = "out", preprocess: dict | None = None
) -> tuple[dict, list[dict], list[dict]]:
    out, reports = tmp_path / tag / "processed", tmp_path / tag / "reports"
    summary = prepare(
        raw, out, reports, labels=LABELS, fractions=SPLIT, salt="test", preprocess=preprocess or PREPROCESS
    )
    with open(out / "manifest.csv") as handle:
        manifest = list(csv.DictReader(handle))
    with open(reports / "skipped.csv") as handle:
        skipped = list(csv.DictReader(handle))
    return summary, manifest, skipped


@pytest.mark.parametrize("layout", ["folders", "petimages", "kaggle"])
def test_each_public_layout_gives_the_same_labelled_images(make_raw, tmp_path, layout):
    summary, manifest, skipped = run_prepare(make_raw(per_class=4, layout=layout), tmp_path)
    assert skipped == []
    assert summary["images"] == 8
    by_hash = {row["sha256"]: row["label"] for row in manifest}
    for label in LABELS:
        for photo in photos(label, 4):
            assert by_hash[sha256_file(photo)] == label
    for row in manifest:  # ImageFolder layout: split/label/file
        split, label, _ = row["file"].split("/")
        assert (split, label) == (row["split"], row["label"])
        assert (tmp_path / "out" / "processed" / row["file"]).is_file()


def test_label_from_folder_wins_over_file_name_and_unknown_is_none(tmp_path):
    assert infer_label(tmp_path / "Dog" / "cat.1.jpg", tmp_path, LABELS) == "dog"
    assert infer_label(tmp_path / "CATS" / "x.jpg", tmp_path, LABELS) == "cat"
    assert infer_label(tmp_path / "misc" / "bird.1.jpg", tmp_path, LABELS) is None


def test_every_broken_file_is_skipped_with_its_reason(make_raw, tmp_path):
    summary, manifest, skipped = run_prepare(make_raw(per_class=2, extra=list(PROBLEM_FILES)), tmp_path)
    reasons = {row["source"]: row["reason"] for row in skipped}
    assert set(reasons) == set(PROBLEM_FILES)
    for source, expected in PROBLEM_FILES.items():
        assert expected in reasons[source], (source, reasons[source])
    assert summary["images"] == 4 and summary["skipped"] == 4
    assert {row["source"] for row in manifest}.isdisjoint(PROBLEM_FILES)


def test_awkward_images_are_kept_byte_for_byte_and_read_upright_rgb_by_training(make_raw, tmp_path):
    """Nothing is re-encoded: training reads each file through the server's decoder (draft, EXIF, background)."""
    _, manifest, skipped = run_prepare(make_raw(per_class=0, extra=AWKWARD), tmp_path)
    assert skipped == []
    rows = {row["source"]: row for row in manifest}
    load = ImageLoader(spec=PreprocessSpec.from_dict(PREPROCESS))
    served = Decoder.from_spec(PREPROCESS)
    images = {}
    for source in AWKWARD:
        prepared = tmp_path / "out" / "processed" / rows[source]["file"]
        assert prepared.read_bytes() == (DATASET / source).read_bytes(), source
        with Image.open(DATASET / source) as original:
            assert (int(rows[source]["width"]), int(rows[source]["height"])) == original.size
            assert rows[source]["format"] == original.format
        images[source] = load(prepared)
        assert images[source].mode == "RGB", source
        assert np.array_equal(np.asarray(images[source]), np.asarray(served((DATASET / source).read_bytes())))
    assert rows[RGBA_PNG]["file"].endswith(".png") and rows[EXIF_ROTATED]["file"].endswith(".jpg")

    def pixels(source: str) -> np.ndarray:
        return np.asarray(images[source], dtype=np.int16)

    with Image.open(DATASET / EXIF_ROTATED) as raw:
        upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"), dtype=np.int16)
        as_stored = np.asarray(raw.convert("RGB"), dtype=np.int16)
    assert np.array_equal(pixels(EXIF_ROTATED), upright)  # 256x256: no draft below the resize size
    assert np.abs(pixels(EXIF_ROTATED) - as_stored).mean() > 10  # the rotation really happened
    gray = pixels(GRAYSCALE)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    with Image.open(DATASET / CMYK) as raw:
        raw.draft("RGB", (256, 256))  # what serving decodes; the old PNG re-encoding lost it
        assert np.array_equal(pixels(CMYK), np.asarray(raw.convert("RGB"), dtype=np.int16))


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 0)])
def test_transparent_pixels_reach_training_on_the_specs_background(tmp_path, background):
    raw = tmp_path / "raw" / "cats"
    raw.mkdir(parents=True)
    (raw / "see-through.png").write_bytes(transparent_png("cats/cat.2.jpg"))
    preprocess = {**PREPROCESS, "alpha_background": list(background)}
    _, [row], skipped = run_prepare(tmp_path / "raw", tmp_path, preprocess=preprocess)
    assert skipped == []
    with Image.open(raw / "see-through.png") as original:
        transparent = np.asarray(original)[..., 3] == 0
    assert transparent.sum() > 1000
    image = ImageLoader(spec=PreprocessSpec.from_dict(preprocess))(tmp_path / "out" / "processed" / row["file"])
    assert (np.asarray(image)[transparent] == background).all()


def test_photos_the_server_would_refuse_are_skipped_with_its_reason(tmp_path):
    raw = tmp_path / "raw" / "dogs"
    raw.mkdir(parents=True)
    (raw / "bomb.png").write_bytes(flat_png(7000, 7000, "RGBA"))
    summary, _, skipped = run_prepare(tmp_path / "raw", tmp_path)
    assert summary["images"] == 0
    assert "MAX_DECODE_BYTES" in skipped[0]["reason"]


def test_split_is_deterministic_and_stable_when_photos_are_added(make_raw, tmp_path):
    raw = make_raw(per_class=20)
    _, first, _ = run_prepare(raw, tmp_path, "first")
    _, again, _ = run_prepare(raw, tmp_path, "again")
    assert first == again
    for photo in photos("cat", 15, start=21) + photos("dog", 15, start=21):
        shutil.copyfile(photo, raw / photo.parent.name / photo.name)
    _, grown, _ = run_prepare(raw, tmp_path, "grown")
    before = {row["sha256"]: row["split"] for row in first}
    after = {row["sha256"]: row["split"] for row in grown}
    assert len(after) == 70
    assert all(after[digest] == split for digest, split in before.items())
    assert {"train", "val", "test"} <= set(after.values())


def test_split_fractions_hold_on_the_whole_dataset():
    digests = [f"{i:064x}" for i in range(20000)]
    splits = [assign_split(d, SPLIT, "salt") for d in digests]
    for name, expected in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / len(splits) - expected) < 0.01


def test_duplicates_are_kept_once_and_cross_class_copies_dropped(make_raw, tmp_path):
    raw = make_raw(per_class=3)
    shutil.copyfile(raw / "cats" / "cat.1.jpg", raw / "cats" / "copy-of-cat.1.jpg")
    shutil.copyfile(raw / "cats" / "cat.2.jpg", raw / "dogs" / "dog.999.jpg")
    summary, manifest, skipped = run_prepare(raw, tmp_path)
    digests = [row["sha256"] for row in manifest]
    assert len(digests) == len(set(digests))  # so no photo can sit in two splits
    reasons = {row["source"]: row["reason"] for row in skipped}
    assert "duplicate of cats/cat.1.jpg" in reasons["cats/copy-of-cat.1.jpg"]
    assert "cats/cat.2.jpg" in reasons and "dogs/dog.999.jpg" in reasons
    assert summary["images"] == 5 and summary["label_conflicts"] == 1  # 6 photos less cat.2


def test_missing_raw_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw data folder not found"):
        prepare(tmp_path / "nope", tmp_path / "o", tmp_path / "r", labels=LABELS, fractions=SPLIT, salt="s",
                preprocess=PREPROCESS)  # fmt: skip


def test_invalid_split_fractions_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitParams(train=0.8, val=0.1, test=0.2)
