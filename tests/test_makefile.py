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
