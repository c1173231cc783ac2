"""The served model: a spec it cannot honour means health-only, and the solo session answers like the shared one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from starlette.testclient import TestClient

from export.convert import METADATA_KEY, write_metadata
from server.app import create_app
from server.model import Model, ModelError
from tests.images import photo_bytes
from tests.test_app import CAT, DOG, assert_error, settings_for


def with_preprocess(onnx_model: Path, target: Path, **changes: object) -> Path:
    """A copy of the real model whose metadata asks for other preprocessing."""
    shutil.copyfile(onnx_model, target)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    metadata["preprocess"].update(changes)
    write_metadata(target, metadata)
    return target


@pytest.mark.parametrize(
    "changes", [{"resize_policy": "longer_side"}, {"interpolation": "lanczos"}, {"crop": "random"}], ids=str
)
def test_a_spec_the_server_cannot_honour_starts_health_only_with_the_reason(onnx_model, tmp_path, changes):
    path = with_preprocess(onnx_model, tmp_path / "model.onnx", **changes)
    with pytest.raises(ModelError, match="cannot honour"):
        Model(path, threads=1, max_pixels=1_000_000)
    with TestClient(create_app(settings_for(path))) as client:
        assert client.get("/health").json() == {"status": "ok", "model_loaded": False}
        ready = client.get("/ready")
        assert_error(ready, 503, "model_not_loaded")
        assert next(iter(changes.values())) in ready.json()["error"]["message"]


def test_the_solo_session_answers_like_the_shared_one(onnx_model):
    model = Model(onnx_model, threads=1, max_pixels=50_000_000, solo_threads=2)
    assert model.solo_session is not None and model.describe()["ort_solo_threads"] == 2
    batch = np.stack([model.preprocess(photo_bytes(CAT)), model.preprocess(photo_bytes(DOG))])
    inputs = {model.input_name: batch}
    shared, solo = model.session.run(None, inputs)[0], model.solo_session.run(None, inputs)[0]
    np.testing.assert_allclose(solo, shared, atol=1e-5)
    assert [model.predict(image).label for image in batch] == ["cat", "dog"] and model.running == 0
    single = Model(onnx_model, threads=2, max_pixels=50_000_000, solo_threads=2)
    assert single.solo_session is None and single.solo_threads == 2  # nothing to gain: one session


def test_onnxruntime_threads_sleep_instead_of_spinning():
    """A spinning intra-op thread burned 15 ms of CPU for each photo a lone client sent (docs/capacity.md, "The
    service's own cost per request"): both sessions' threads sleep when they have no work."""
    from server.model import session_options

    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
