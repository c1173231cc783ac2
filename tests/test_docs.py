"""The docs cannot drift from the code: metric names, make targets, the settings table and error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from imaging import Decoder, ImageError
from server.app import create_app
from server.config import settings_markdown
from tests.conftest import ROOT
from tests.images import SPEC, photo_bytes
from tests.test_app import CAT, settings_for
from tests.test_makefile import targets

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MONITORING = [*sorted((ROOT / "monitoring").rglob("*.yml")), *sorted((ROOT / "monitoring").rglob("*.json"))]
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)  # fenced blocks and inline code spans
MAKE = re.compile(r"(?<![\w./-])make ((?:[A-Z_]+=\S+ )*)([a-z][\w-]*)")


def code_spans(path: Path) -> list[str]:
    return CODE.findall(path.read_text())


@pytest.fixture(scope="module")
def exported(onnx_model: Path) -> set[str]:
    """Every sample and histogram name the service exports once it has served a prediction, an error and a
    feedback (a histogram is named by its base name in PromQL's histogram_quantile, and its _bucket samples)."""
    with TestClient(create_app(settings_for(onnx_model))) as client:
        answer = client.post("/predict", files={"file": ("cat.jpg", photo_bytes(CAT), "image/jpeg")})
        client.post("/feedback", json={"request_id": answer.headers["x-request-id"], "label": "cat"})
        client.post("/predict", content=b"", headers={"content-type": "image/jpeg"})
        text = client.get("/metrics").text
    return set(re.findall(r"^(?:# TYPE )?(catsdogs_\w+)", text, re.MULTILINE))


@pytest.mark.parametrize("path", [*DOCS, *MONITORING], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_metric_the_docs_and_dashboards_name_is_exported(path, exported):
    named = set(re.findall(r"catsdogs_[a-z_]+[a-z]", path.read_text()))
    named = {name for name in named if not name.startswith(("catsdogs_mobilenet", "catsdogs_serve"))}  # not metrics
    assert named <= exported, f"{path.name} names metrics the service does not export: {sorted(named - exported)}"


def test_the_alerts_and_dashboard_watch_feedback_and_drift():
    used = set().union(*(re.findall(r"catsdogs_\w+", path.read_text()) for path in MONITORING))
    assert {"catsdogs_feedback_total", "catsdogs_drift_psi", "catsdogs_drift_window_predictions"} <= used


@pytest.mark.parametrize("path", [*DOCS, *sorted((ROOT / ".github" / "workflows").glob("*.yml"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())  # fmt: skip
def test_every_make_target_the_docs_name_exists(path):
    text = "\n".join(code_spans(path)) if path.suffix == ".md" else path.read_text()
    named = {match.group(2) for match in MAKE.finditer(text)}
    assert named <= set(targets()), (
        f"{path.name} names make targets that do not exist: {sorted(named - set(targets()))}"
    )


def test_the_readme_settings_table_is_the_one_the_service_reads():
    table = settings_markdown()
    assert table in (ROOT / "README.md").read_text(), (
        "README.md's settings table differs from server/config.py's SETTINGS; paste the output of\n"
        "python -c 'from server.config import settings_markdown; print(settings_markdown())'\n\n" + table
    )


def decoder_message(data: bytes) -> tuple[str, str]:
    try:
        Decoder.from_spec(SPEC)(data)
    except ImageError as error:
        return error.code, error.message
    raise AssertionError("decoded")


def test_error_examples_in_the_docs_are_the_decoders_own_words():
    actual = dict(decoder_message(data) for data in (b"", b"<html>not an image</html>", photo_bytes(CAT)[:300]))
    quoted = re.compile(r"""["']code["']: ["'](\w+)["'], ["']message["']: ["']([^"']+)["']""")
    examples = [(path.name, *match) for path in DOCS for match in quoted.findall(path.read_text())]
    assert examples, "the docs quote no error example"
    for name, code, message in examples:
        if code == "corrupt_image":  # Pillow's own detail follows the decoder's words
            assert message.startswith(actual[code].split(":")[0]), (name, code, message)
        elif code in actual:
            assert message == actual[code], (name, code, message)


def test_the_readme_names_every_server_module_once():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| module | owns |") :].split("\n\n")[0]
    named = re.findall(r"`(\w+)\.py`", table)
    modules = sorted(path.stem for path in (ROOT / "server").glob("*.py") if path.stem != "__init__")
    assert sorted(named) == modules, f"README's server table lists {sorted(named)}, server/ holds {modules}"
