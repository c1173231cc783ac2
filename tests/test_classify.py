"""`make classify`: a folder of photos into a predictions file, in process or against the running service."""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import classify
from deploy.client import free_port
from tests.conftest import DATASET, ROOT, photos

SERVE_STACK = {"onnxruntime", "numpy", "PIL", "tqdm", "deploy", "server", "imaging"}
BROKEN = {"cat.90001.jpg": "empty_image", "cat.90003.jpg": "invalid_image", "dog.90002.jpg": "corrupt_image"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Good photos at two depths, the shared set's broken files, and a Thumbs.db that is not an image."""
    root = tmp_path / "catalogue"
    (root / "2024" / "june").mkdir(parents=True)
    for photo in [*photos("cat", 3), *photos("dog", 2)]:
        shutil.copyfile(photo, root / photo.name)
    for photo in [*photos("cat", 2, start=4), *photos("dog", 2, start=3)]:
        shutil.copyfile(photo, root / "2024" / "june" / photo.name.upper())
    for name in [*BROKEN, "Thumbs.db"]:
        source = DATASET / ("dogs" if name.startswith("dog") else "cats") / name
        shutil.copyfile(source, root / "2024" / name)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def expected_label(path: str) -> str | None:
    name = Path(path).name.lower()
    return None if ".900" in name else name.split(".")[0]


def test_every_image_in_process_with_errors_recorded(folder, tmp_path, onnx_model, capsys):
    out = tmp_path / "predictions.csv"
    classify.main([str(folder), str(out), "--model", str(onnx_model), "--batch-size", "4"])
    rows = read_csv(out)
    assert len(rows) == 12 and len({row["path"] for row in rows}) == 12
    assert "2024/june/CAT.4.JPG" in {row["path"] for row in rows} and not any("Thumbs" in r["path"] for r in rows)
    assert list(rows[0])[:2] == ["path", "label"] and list(rows[0])[-2:] == ["error_code", "error"]
    for row in rows:
        truth = expected_label(row["path"])
        if truth is None:
            assert row["label"] == "" and row["error_code"] == BROKEN[Path(row["path"]).name] and row["error"]
        else:
            assert row["error_code"] == row["error"] == ""
            probabilities = {"cat": float(row["probabilities.cat"]), "dog": float(row["probabilities.dog"])}
            assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
            assert row["label"] == max(probabilities, key=probabilities.get)
    assert sum(row["label"] == expected_label(row["path"]) for row in rows) >= 8  # the seeded model is ~94%
    summary = capsys.readouterr().out
    assert "12 rows" in summary and "errors: 3" in summary
    assert "left out, not an image by name: 1 file (2024/Thumbs.db)" in summary
    not_pets = sum(row.get("is_pet") == "False" for row in rows)
    assert f"not a pet (is_pet false, label not to be trusted): {not_pets} row" in summary


def test_in_process_and_the_service_agree(folder, tmp_path, onnx_model, service):
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    classify.main([str(folder), str(local), "--model", str(onnx_model)])
    classify.main([str(folder), str(remote), "--url", service.url, "--concurrency", "2"])
    by_path = {row["path"]: row for row in read_csv(remote)}
    rows = read_csv(local)
    assert list(rows[0]) == list(next(iter(by_path.values())))  # the same columns either way
    for row in rows:
        other = by_path[row["path"]]
        assert (row["label"], row["error_code"]) == (other["label"], other["error_code"])
        if row["label"]:
            assert float(row["probabilities.cat"]) == pytest.approx(float(other["probabilities.cat"]), abs=1e-6)


def test_json_lines_by_extension(folder, tmp_path, service):
    out = tmp_path / "predictions.jsonl"
    classify.main([str(folder), str(out), "--url", service.url])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    good = [row for row in rows if "label" in row]
    assert len(good) == 9 and all(set(row["probabilities"]) == {"cat", "dog"} for row in good)
    assert sorted(row["error_code"] for row in rows if "error_code" in row) == sorted(BROKEN.values())


def test_resume_skips_rows_already_written_and_cuts_a_half_written_line(folder, tmp_path, onnx_model, capsys):
    out = tmp_path / "predictions.csv"
    later = folder / "later"
    later.mkdir()
    shutil.move(folder / "cat.1.jpg", later / "cat.1.jpg")
    classify.main([str(folder), str(out), "--model", str(onnx_model)])
    first = out.read_text()
    with out.open("a") as file:
        file.write("later/cat.1.jpg,dog,0.1")  # a run killed mid-line
    capsys.readouterr()
    classify.main([str(folder), str(out), "--model", str(onnx_model)])
    assert "12 rows" in capsys.readouterr().out
    assert out.read_text().startswith(first)
    rows = read_csv(out)
    assert [row["path"] for row in rows].count("later/cat.1.jpg") == 1 and len(rows) == 12
    [resumed] = [row for row in rows if row["path"] == "later/cat.1.jpg"]
    assert resumed["label"] == "cat" and float(resumed["probabilities.cat"]) > 0.5
    capsys.readouterr()
    classify.main([str(folder), str(out), "--model", str(onnx_model)])
    assert "0 new, 12 already there" in capsys.readouterr().out and len(read_csv(out)) == 12


def test_an_interrupt_while_resuming_loses_no_row_already_written(tmp_path, monkeypatch):
    out = tmp_path / "predictions.csv"
    rows = [{"path": f"{i}.jpg", "label": "cat", "probabilities": {"cat": 0.9, "dog": 0.1}} for i in range(5)]
    results = classify.ResultsFile(out)
    for row in rows:
        results.write(row)
    results.write({"path": "x.jpg", **classify.error_row("server_error", "HTTP 500")})  # retried on resume
    before = out.read_text()
    written = []

    def interrupted(self: classify.ResultsFile, row: dict) -> None:
        written.append(row)
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C halfway through rewriting the file without the failed row
        original(self, row)

    original = classify.ResultsFile.write
    monkeypatch.setattr(classify.ResultsFile, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classify.ResultsFile(out)
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
    monkeypatch.undo()
    resumed = classify.ResultsFile(out)
    assert sorted(resumed.done) == [f"{i}.jpg" for i in range(5)] and len(read_csv(out)) == 5


def test_an_unreachable_service_is_recorded_then_retried_on_resume(folder, tmp_path, service):
    out = tmp_path / "predictions.jsonl"
    classify.main([str(folder), str(out), "--url", f"http://127.0.0.1:{free_port()}"])
    assert {json.loads(line)["error_code"] for line in out.read_text().splitlines()} == {"unreachable"}
    classify.main([str(folder), str(out), "--url", service.url])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and sum("label" in row for row in rows) == 9
    assert "unreachable" not in {row.get("error_code") for row in rows}


def test_extra_prediction_fields_become_columns(tmp_path):
    row = {"path": "a.jpg", "label": "cat", "probabilities": {"cat": 0.9, "dog": 0.1}, "is_pet": True,
           "pet_score": 0.97, "model_version": "v1"}  # fmt: skip
    assert classify.columns_for(row) == ["path", "label", "probabilities.cat", "probabilities.dog", "is_pet",
                                         "pet_score", "model_version", "error_code", "error"]  # fmt: skip
    output = classify.ResultsFile(tmp_path / "out.csv")
    output.write({"path": "bad.jpg", **classify.error_row("empty_image", "empty")})  # before any prediction
    output.write(row)
    output.flush()
    rows = read_csv(tmp_path / "out.csv")
    assert [r["path"] for r in rows] == ["bad.jpg", "a.jpg"] and rows[1]["is_pet"] == "True"


def test_a_missing_folder_or_model_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        classify.main([str(tmp_path / "nope"), str(tmp_path / "out.csv")])
    with pytest.raises(SystemExit, match="model file not found"):
        classify.main([str(tmp_path), str(tmp_path / "out.csv"), "--model", str(tmp_path / "absent.onnx")])


def test_it_needs_nothing_but_the_serving_stack(onnx_model, tmp_path):
    tree = ast.parse((ROOT / "deploy" / "classify.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top in SERVE_STACK or top in sys.stdlib_module_names, f"deploy/classify.py imports {name}"
    (tmp_path / "in").mkdir()
    shutil.copyfile(photos("dog", 1)[0], tmp_path / "in" / "dog.jpg")
    code = ("import sys, runpy; sys.argv = ['classify', *sys.argv[1:]]\n"
            "try: runpy.run_module('deploy.classify', run_name='__main__')\n"
            "finally: assert 'torch' not in sys.modules, 'torch was imported'")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "out.csv"),
                             "--model", str(onnx_model)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_csv(tmp_path / "out.csv")[0]["label"] == "dog"


def test_make_classify(onnx_model, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copyfile(photos("cat", 1)[0], tmp_path / "in" / "cat.jpg")
    env = {**os.environ, "MODEL_PATH": str(onnx_model)}
    command = ["make", "--no-print-directory", "classify", f"INPUT={tmp_path / 'in'}", f"OUTPUT={tmp_path / 'p.csv'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 row in" in result.stdout and read_csv(tmp_path / "p.csv")[0]["label"] == "cat"
