"""The Prometheus alert rules, unit-tested by promtool (Debian's prometheus package; CI installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

RULES = ROOT / "monitoring" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None and not os.environ.get("CI"):
        pytest.skip("promtool is not installed (apt-get install prometheus); CI installs it")
    assert found, "CI must install promtool (Debian's prometheus package)"
    return found


def test_the_rules_are_valid(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES / "alerts.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hang_ups_and_saturation_do_not_page_and_server_errors_do(promtool):
    """monitoring/prometheus/alerts.test.yml: 499s, 408s and designed 503s page nobody, 5xx page at 1%, saturation
    has its own ticket, and labels refused at the feedback store's bound open a ticket naming their source."""
    result = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=RULES, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
