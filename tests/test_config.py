"""Settings from the environment and `python -m server` as a command: one-line errors, --help, warnings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import SETTINGS, Settings, available_cpus, cgroup_cpu_quota
from tests.conftest import ROOT
from tests.service import Service

BAD_VALUES = {
    "PORT": ["0", "70000", "eighty"],
    "WORKERS": ["0", "two"],
    "ORT_THREADS": ["0", "-1", "1.5"],
    "INFERENCE_CONCURRENCY": ["0", "-3", "many"],
    "MAX_UPLOAD_BYTES": ["0", "10MB"],
    "ORT_SOLO_THREADS": ["-1", "all"],
    "MAX_QUEUE": ["-1", "long"],
    "MAX_ADMITTED_BYTES": ["0", "64MiB"],
    "QUEUE_TIMEOUT": ["0", "10s"],
    "MAX_CONNECTIONS": ["0", "lots"],
    "STORE_TIMEOUT": ["0", "5s"],
    "OBSERVER_MAX_BYTES": ["0", "64MiB"],
    "HEADER_TIMEOUT": ["0", "20s"],
    "HEADER_TIMEOUT_MAX": ["0", "-1"],
    "BODY_TIMEOUT": ["0", "1.5"],
    "BODY_TIMEOUT_MAX": ["0", "a minute"],
    "READ_MIN_RATE": ["0", "500B"],
    "DECODE_CONCURRENCY": ["0", "-2", "x"],
    "MAX_IMAGE_PIXELS": ["0", "lots"],
    "MAX_DECODE_BYTES": ["0", "64MiB"],
    "MAX_BATCH_FILES": ["0", "x"],
    "LOG_LEVEL": ["verbose"],
    "LOG_FORMAT": ["yaml"],
    "GRACEFUL_TIMEOUT": ["-1", "soon"],
    "FEEDBACK_STORE_SIZE": ["0", "many"],
    "FEEDBACK_IMAGES_DAYS": ["0", "a week"],
    "FEEDBACK_IMAGES_MAX_BYTES": ["0", "1GiB"],
    "FEEDBACK_LABELLED_MAX_BYTES": ["0", "1GiB"],
    "FEEDBACK_ANONYMOUS_LABELLED_MAX_BYTES": ["0", "lots"],
    "PREDICT_REQUIRES_KEY": ["yes", "1"],
    "FEEDBACK_RATE": ["-1", "fast", "inf"],
    "FEEDBACK_BURST": ["0", "x"],
    "KEY_FEEDBACK_RATE": ["-0.5", "x"],
    "KEY_FEEDBACK_BURST": ["0", "lots"],
    "PREDICT_RATE": ["-1", "nan"],
    "PREDICT_BURST": ["0", "x"],
    "PET_THRESHOLD": ["1.5", "-0.1", "high"],
    "DRIFT_WINDOW": ["0", "x"],
    "PREDICTION_LOG_SAMPLE_EVERY": ["-1", "often"],
    "PREDICTION_LOG_MAX_BYTES": ["0", "8MiB"],
    "PREDICTION_LOG_BACKUPS": ["-1", "some"],
    "PREDICTION_SAMPLES_MAX_BYTES": ["0", "lots"],
}
# any string is a valid path or host name
FREE_FORM = {"MODEL_PATH", "HOST", "FEEDBACK_DB", "FEEDBACK_IMAGES", "API_KEYS_FILE", "PREDICTION_LOG"}


def run_server(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PORT": "1", "HOST": "127.0.0.1", "MODEL_PATH": "absent.onnx", **env}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_one_table_declares_every_setting_once():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(Settings)]


def test_every_validated_variable_has_a_bad_value_here():
    assert set(BAD_VALUES) | FREE_FORM == {s.name for s in SETTINGS}


@pytest.mark.parametrize("name", [s.name for s in SETTINGS])
def test_empty_is_the_default_for_every_setting(name):
    assert Settings.from_env({name: ""}, cpus=4) == Settings.from_env({}, cpus=4)


def test_defaults_follow_the_cpus_and_the_settings_before_them():
    four = Settings.from_env({}, cpus=4)
    assert (four.inference_concurrency, four.max_queue, four.decode_concurrency, four.ort_solo_threads) == (8, 32, 4, 4)
    two_workers = Settings.from_env({"WORKERS": "2", "ORT_THREADS": "2"}, cpus=4)
    assert (two_workers.inference_concurrency, two_workers.max_queue, two_workers.decode_concurrency) == (2, 8, 2)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in BAD_VALUES.items() for v in values])
def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_2(name, value):
    result = run_server(**{name: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert name in lines[0] and repr(value) in lines[0]
    assert result.stdout == ""


def test_help_lists_every_setting_with_its_default_and_exits_without_serving():
    result = run_server("--help", PORT="8000")
    assert result.returncode == 0 and result.stderr == ""
    for setting in SETTINGS:
        [line] = [line for line in result.stdout.splitlines() if line.strip().startswith(setting.name + " ")]
        assert f"(default: {setting.default_text.replace('`', '')})" in line
        assert setting.meaning.replace("`", "") in line
    assert f"CPUs here: {available_cpus()}" in result.stdout
    assert "startup" not in result.stdout and "Uvicorn running" not in result.stdout


def test_a_renamed_setting_is_refused_with_its_new_name():
    result = run_server(MAX_QUEUE_BYTES="50331648")
    assert result.returncode == 2 and result.stderr.strip() == (
        "python -m server: MAX_QUEUE_BYTES was renamed MAX_ADMITTED_BYTES: set MAX_ADMITTED_BYTES instead"
    )


@pytest.mark.parametrize("name", ["FEEDBACK_DB", "PREDICTION_LOG", "FEEDBACK_IMAGES"])
def test_a_file_the_service_cannot_write_is_one_line_and_exit_code_2(name, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_server(**{name: str(blocker / "inside" / "x.db")})  # a folder cannot be made inside a file
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert name in line and ("cannot write it" in line or "cannot write in it" in line)


def test_unknown_arguments_are_refused():
    result = run_server("--port", "9000")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_oversubscription_is_flagged_only_past_the_cpus():
    settings = dataclasses.replace(Settings.from_env(), workers=2, ort_threads=2)
    assert settings.oversubscription(cpus=4) is None
    warning = settings.oversubscription(cpus=2)
    assert warning and "WORKERS=2 x ORT_THREADS=2 = 4" in warning and "2 CPUs" in warning


def test_the_service_warns_once_when_threads_exceed_the_cpus(onnx_model: Path):
    threads = available_cpus() + 1
    service = Service(onnx_model, ORT_THREADS=str(threads))
    try:
        service.wait_ready()
    finally:
        service.stop()
    warnings = [r for r in service.records() if r["level"] == "warning"]
    assert len(warnings) == 1 and f"ORT_THREADS={threads}" in warnings[0]["message"]


def test_the_default_settings_start_without_a_warning(onnx_model: Path):
    service = Service(onnx_model, ORT_THREADS="", WORKERS="")
    try:
        service.wait_ready()
    finally:
        service.stop()
    assert not [r for r in service.records() if r["level"] == "warning"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_is_read_from_cgroup_v2_and_v1(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected
