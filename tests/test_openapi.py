"""The OpenAPI document describes the service as it really is: schemathesis against the live service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
from starlette.routing import Route

from server.app import create_app
from tests.conftest import ROOT

SCHEMATHESIS = Path(sys.executable).parent / "st"


def test_every_route_is_documented(service):
    document = httpx.get(f"{service.url}/openapi.json", timeout=5).json()
    assert document["openapi"] == "3.1.0"
    routes = {(route.path, method.lower()) for route in create_app().routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}  # fmt: skip
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]


def test_schemathesis_finds_no_nonconforming_response_and_no_5xx(service):
    command = [str(SCHEMATHESIS), "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "--no-color", "run",
               f"{service.url}/openapi.json", "--checks", "all", "--max-examples", "30", "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--seed", "20260127", "--request-timeout", "30"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert ("generated" in result.stdout and "No issues found" in result.stdout) or " passed" in result.stdout
    assert not [r for r in service.records() if r.get("status", 0) >= 500]
