"""The Makefile documents itself: every target has one line, and `make` alone lists them."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

RULE = re.compile(r"^([a-zA-Z0-9_-]+):(?![=:])(.*)$")


def targets() -> dict[str, str]:
    """Each user-facing target and the text after its `##` ('' when it has none)."""
    found = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = RULE.match(line)
        if match:
            found[match.group(1)] = match.group(2).split("##", 1)[1].strip() if "##" in match.group(2) else ""
    return found


def phony() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith(".PHONY:")]
    return set(line.split(":", 1)[1].split())


def test_every_target_is_phony_and_documented_in_one_line():
    found = targets()
    assert {"help", "setup", "setup-serve", "serve", "classify", "eval-deployed", "test", "lint"} <= set(found)
    assert set(found) == phony()
    undocumented = [name for name, text in found.items() if not text]
    assert not undocumented, f"targets without `## one line`: {undocumented}"


def test_make_alone_lists_every_target():
    result = subprocess.run(["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == targets()
    assert list(listed) == sorted(listed)


REMOVE_INT8 = "rm -f models/model.int8.onnx models/model.int8.json"


def make_dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    """`make -n` (commands printed, nothing run) without rebuilding the venv."""
    return subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_export_quantizes_to_int8_by_default_after_removing_the_old_int8_model():
    result = make_dry_run("export")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    # the old int8 goes before the float32 export, so a refused or failed export cannot leave it alone to be served
    order = [commands.index(REMOVE_INT8), commands.index("dvc repro evaluate"),
             commands.index("dvc repro --force --single-item quantize")]  # fmt: skip
    assert order == sorted(order) and "python -m export.served" not in commands


def test_export_with_quantize_none_leaves_float32_served():
    result = make_dry_run("export", "QUANTIZE=none")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert (
        commands.index(REMOVE_INT8) < commands.index("dvc repro evaluate") < commands.index("python -m export.served")
    )
    assert not any("quantize" in command for command in commands)


def test_an_unknown_quantize_value_stops_before_anything_runs():
    for value in ("fp16", "INT8", ""):
        result = make_dry_run("export", f"QUANTIZE={value}")
        assert result.returncode == 2 and not result.stdout
        assert f"Invalid QUANTIZE={value}. Only int8, none are supported" in result.stderr
    assert make_dry_run("help", "QUANTIZE=fp16").returncode == 0  # only export reads it


def test_export_and_retrain_end_with_the_one_champion_rule_and_train_decides_nothing():
    """make export decides the served file (loop.champion) after it is exported; PRODUCTION names what production
    runs and BOOTSTRAP=1 is the only way a first model becomes a candidate; make train moves no alias."""
    commands = make_dry_run("export").stdout.splitlines()
    assert commands[-1].split() == ["python", "-m", "loop.champion"]
    assert commands.index("dvc repro --force --single-item quantize") < len(commands) - 1
    assert make_dry_run("export", "PRODUCTION=7").stdout.splitlines()[-1].split() == [
        "python", "-m", "loop.champion", '--production', '"7"']  # fmt: skip
    assert make_dry_run("decide", "BOOTSTRAP=1").stdout.split() == ["python", "-m", "loop.champion", "--bootstrap"]
    retrain = make_dry_run("retrain", "PRODUCTION=catsdogs-mobilenetv2-v7").stdout.splitlines()[-1]
    assert retrain.startswith("python -m loop.retrain") and '--production "catsdogs-mobilenetv2-v7"' in retrain
    train = make_dry_run("train").stdout
    assert "dvc repro train_final" in train and "champion" not in train
