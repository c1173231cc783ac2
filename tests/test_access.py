"""API keys, scopes and rate limits: `make api-key`, the service's 401/403/429, sources recorded, keys never logged."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from server.access import RateLimiter
from server.keys import KeyRing, add_key, digest
from tests.conftest import ROOT, running_service
from tests.images import photo_bytes
from tests.test_app import assert_error

CAT, DOG = "cats/cat.1.jpg", "dogs/dog.1.jpg"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(url: str, name: str = CAT, headers: dict[str, str] | None = None) -> httpx.Response:
    files = {"file": (Path(name).name, photo_bytes(name), "image/jpeg")}
    return httpx.post(f"{url}/predict", files=files, headers=headers or {}, timeout=30)


def feedback(url: str, prediction_id: str, label: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"prediction_id": prediction_id, "label": label}
    return httpx.post(f"{url}/feedback", json=body, headers=headers or {}, timeout=30)


def test_make_api_key_prints_the_key_last_and_keeps_only_its_hash(tmp_path):
    keys = tmp_path / "keys" / "api-keys.jsonl"
    run = subprocess.run(["make", "-s", "api-key", "NAME=alice", "SCOPES=label,predict", f"API_KEYS_FILE={keys}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip().splitlines()[-1]
    [entry] = [json.loads(line) for line in keys.read_text().splitlines()]
    assert key.startswith("cdk_") and key not in keys.read_text()
    assert entry["name"] == "alice" and entry["scopes"] == ["label", "predict"] and entry["sha256"] == digest(key)
    assert entry["created"].endswith("Z") and keys.stat().st_mode & 0o777 == 0o600
    hostile = subprocess.run(["make", "-s", "api-key", "NAME=bob; touch pwned", f"API_KEYS_FILE={keys}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert hostile.returncode != 0 and "NAME must match" in hostile.stderr and not (ROOT / "pwned").exists()
    again = subprocess.run(["make", "-s", "api-key", "NAME=alice", f"API_KEYS_FILE={keys}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode != 0 and "already has a key named 'alice'" in again.stderr


def test_the_key_ring_rereads_the_file_and_fails_closed(tmp_path):
    path = tmp_path / "keys.jsonl"
    alice, bob = add_key(path, "alice", ["label"]), add_key(path, "bob", ["predict"])
    ring = KeyRing(path)
    assert ring.identify(alice).name == "alice" and ring.identify(bob).scopes == {"predict"}
    assert ring.identify(alice + "x") is None and ring.identify("") is None
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if '"bob"' not in line))
    ring.checked -= 2  # as if a second went by
    assert ring.identify(bob) is None and ring.identify(alice).name == "alice"
    path.write_text('{"name": "anonymous", "sha256": "' + digest(alice) + '", "scopes": ["label"]}\nnot json\n')
    ring.checked -= 2
    assert ring.identify(alice) is None  # "anonymous" is no key's name; a broken line is skipped
    path.unlink()
    ring.checked -= 2
    assert ring.identify(alice) is None and ring.entries == []


def test_a_token_bucket_allows_its_burst_then_its_rate():
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.wait("a", now=100.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.wait("a", now=100.0) == pytest.approx(0.5)  # one token comes every 0.5 s
    assert limiter.wait("b", now=100.0) == 0  # each client has its own bucket
    assert limiter.wait("a", now=100.5) == 0 and limiter.wait("a", now=100.5) > 0
    assert RateLimiter(rate=0, burst=1).wait("a") == 0  # rate 0: no limit
    small = RateLimiter(rate=1, burst=1, max_buckets=2)
    small.wait("a", now=0), small.wait("b", now=0), small.wait("c", now=0)
    assert list(small.buckets) == ["b", "c"]  # the least recently seen is forgotten


@pytest.fixture(scope="module")
def keyed(onnx_model, tmp_path_factory):
    """A real service with a keys file (a labeller, a predict-only key) and photos kept: (service, keys, db)."""
    folder = tmp_path_factory.mktemp("keyed")
    path = folder / "api-keys.jsonl"
    keys = {"labeller": add_key(path, "labeller", ["label"]), "client": add_key(path, "client", ["predict"])}
    db = folder / "feedback.db"
    env = {"API_KEYS_FILE": str(path), "FEEDBACK_DB": str(db), "FEEDBACK_BURST": "3", "FEEDBACK_RATE": "0.01"}
    with contextlib.contextmanager(running_service)(onnx_model, **env) as service:
        yield service, keys, db, path


def test_labels_record_their_source_and_wrong_keys_are_401(keyed):
    service, keys, db, _ = keyed
    url = service.url
    first, second = predict(url).json()["prediction_id"], predict(url, DOG).json()["prediction_id"]
    trusted = feedback(url, first, "cat", bearer(keys["labeller"]))
    assert trusted.status_code == 200 and trusted.json()["source"] == "labeller"
    assert feedback(url, second, "dog").json()["source"] == "anonymous"
    for headers, code in [(bearer(keys["labeller"] + "x"), "invalid_key"), ({"Authorization": "Basic abc"},
                          "invalid_key"), ({"Authorization": "Bearer"}, "invalid_key")]:  # fmt: skip
        response = feedback(url, second, "dog", headers)
        assert_error(response, 401, code)
        assert response.headers["www-authenticate"].startswith('Bearer realm="catsdogs"')
    refused = feedback(url, second, "dog", bearer(keys["client"]))  # a key without the label scope
    assert_error(refused, 403, "insufficient_scope")
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    with sqlite3.connect(db) as rows:
        sources = dict(rows.execute("SELECT prediction_id, feedback_source FROM predictions "
                                    "WHERE feedback IS NOT NULL").fetchall())  # fmt: skip
    assert sources[first] == "labeller" and sources[second] == "anonymous"
    text = "\n".join(service.lines)
    assert keys["labeller"] not in text and keys["client"] not in text  # never logged, right or wrong
    logged = service.wait_for_records(lambda r: r.get("path") == "/feedback" and r.get("caller") == "labeller")
    assert logged[0]["status"] == 200


def test_a_keys_label_replaces_an_anonymous_one_never_the_reverse(keyed):
    service, keys, db, _ = keyed
    photo = predict(service.url).json()["prediction_id"]
    assert feedback(service.url, photo, "dog").status_code == 200  # an anonymous client got there first
    assert feedback(service.url, photo, "cat", bearer(keys["labeller"])).json()["source"] == "labeller"
    assert_error(feedback(service.url, photo, "dog"), 409, "feedback_conflict")
    with sqlite3.connect(db) as rows:
        assert rows.execute("SELECT feedback, feedback_source FROM predictions WHERE prediction_id = ?",
                            (photo,)).fetchone() == ("cat", "labeller")  # fmt: skip


def test_anonymous_feedback_is_rate_limited_per_address_and_a_key_has_its_own_bucket(keyed):
    service, keys, _, _ = keyed
    ids = [predict(service.url).json()["prediction_id"] for _ in range(5)]
    time.sleep(0.05)
    statuses = [feedback(service.url, i, "cat").status_code for i in ids]
    assert 429 in statuses and statuses.count(429) >= 2, statuses  # a burst of 3 (fewer left after other tests)
    limited = feedback(service.url, ids[-1], "cat")
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert feedback(service.url, ids[-1], "cat", bearer(keys["labeller"])).status_code == 200
    metrics = httpx.get(f"{service.url}/metrics").text
    assert 'catsdogs_rate_limited_total{client="anonymous",route="feedback"}' in metrics


def test_a_deleted_line_revokes_its_key_without_a_restart(keyed, onnx_model):
    service, keys, _, path = keyed
    before = path.read_text()
    try:
        photo = predict(service.url).json()["prediction_id"]
        path.write_text("".join(line + "\n" for line in before.splitlines() if '"labeller"' not in line))
        deadline = time.monotonic() + 5
        while (status := feedback(service.url, photo, "cat", bearer(keys["labeller"])).status_code) != 401:
            assert status == 200 and time.monotonic() < deadline
            photo = predict(service.url).json()["prediction_id"]
            time.sleep(0.2)
    finally:
        path.write_text(before)


def test_an_operator_can_require_keys_for_predictions(onnx_model, tmp_path):
    path = tmp_path / "keys.jsonl"
    client, labeller = add_key(path, "client", ["predict"]), add_key(path, "labeller", ["label"])
    with contextlib.contextmanager(running_service)(onnx_model, API_KEYS_FILE=str(path),
                                                    PREDICT_REQUIRES_KEY="true") as service:  # fmt: skip
        assert_error(predict(service.url), 401, "key_required")
        assert_error(predict(service.url, headers=bearer(labeller)), 403, "insufficient_scope")
        assert predict(service.url, headers=bearer(client)).status_code == 200
        v2 = httpx.post(f"{service.url}/v2/models/catsdogs/infer", json={"inputs": []}, timeout=30)
        assert v2.status_code == 401 and "key" in v2.json()["error"]  # the protocol's error body
        assert httpx.get(f"{service.url}/ready").status_code == 200  # probes need no key


def test_no_usable_credentials_get_a_challenge_without_an_error_code(onnx_model, tmp_path):
    """RFC 6750 section 3.1: a request with no key (or another scheme) gets no error code; a key sent and wrong
    gets invalid_token, a key without the scope insufficient_scope (403); on every route that checks keys."""
    path = tmp_path / "keys.jsonl"
    client, labeller = add_key(path, "client", ["predict"]), add_key(path, "labeller", ["label"])
    bare, needs_predict = 'Bearer realm="catsdogs"', 'Bearer realm="catsdogs", scope="predict"'
    with contextlib.contextmanager(running_service)(onnx_model, API_KEYS_FILE=str(path),
                                                    PREDICT_REQUIRES_KEY="true") as service:  # fmt: skip
        v2 = f"{service.url}/v2/models/catsdogs/infer"
        for response in [predict(service.url), httpx.post(v2, json={"inputs": []}, timeout=30)]:
            assert response.status_code == 401 and response.headers["www-authenticate"] == needs_predict
        for headers in [{"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, {"Authorization": "Token abc"}]:
            for response in [predict(service.url, headers=headers), feedback(service.url, "x", "cat", headers)]:
                assert_error(response, 401, "invalid_key")
                assert response.headers["www-authenticate"] == bare, headers
        for response in [predict(service.url, headers=bearer(client + "x")),
                         feedback(service.url, "x", "cat", bearer(labeller + "x"))]:  # fmt: skip
            assert_error(response, 401, "invalid_key")
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith(bare + ', error="invalid_token", error_description=')
        scoped = predict(service.url, headers=bearer(labeller))
        assert_error(scoped, 403, "insufficient_scope")
        assert 'error="insufficient_scope"' in scoped.headers["www-authenticate"]
        assert scoped.headers["www-authenticate"].endswith(', scope="predict"')
        refused = feedback(service.url, "x", "cat", bearer(client))
        assert_error(refused, 403, "insufficient_scope")
        assert refused.headers["www-authenticate"].endswith(', scope="label"')
        assert predict(service.url, headers=bearer(client)).status_code == 200


def test_predict_rate_limits_follow_the_forwarded_address_only_from_a_trusted_proxy(onnx_model):
    def statuses(service, addresses: list[str]) -> list[int]:
        return [predict(service.url, headers={"X-Forwarded-For": a}).status_code for a in addresses]

    common = {"PREDICT_RATE": "0.01", "PREDICT_BURST": "2"}
    with contextlib.contextmanager(running_service)(onnx_model, FORWARDED_ALLOW_IPS="127.0.0.1", **common) as s:
        assert statuses(s, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.1"]) == [200, 200, 200, 200, 429]
    with contextlib.contextmanager(running_service)(onnx_model, FORWARDED_ALLOW_IPS="192.0.2.1", **common) as s:
        # an untrusted client's X-Forwarded-For is ignored: one bucket for its real address
        assert statuses(s, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == [200, 200, 429]


def test_api_keys_file_that_cannot_be_read_stops_the_start(onnx_model, tmp_path):
    env = {**os.environ, "MODEL_PATH": str(onnx_model), "PORT": "1", "API_KEYS_FILE": str(tmp_path / "missing")}
    run = subprocess.run(
        [sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "API_KEYS_FILE" in run.stderr


def test_keys_required_without_a_keys_file_stops_the_start(onnx_model):
    env = {**os.environ, "MODEL_PATH": str(onnx_model), "PORT": "1", "PREDICT_REQUIRES_KEY": "true"}
    env.pop("API_KEYS_FILE", None)
    run = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 2 and "PREDICT_REQUIRES_KEY=true needs API_KEYS_FILE" in run.stderr
