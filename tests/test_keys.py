"""API keys: a revoked key's line stays, so its name is never given to another key (labels are recorded under the
name), the service refuses the key, and `make harvest` no longer takes its labels (server.keys.labellers)."""

from __future__ import annotations

import json
import re

import pytest

from server.keys import NAME, SCOPES, Identity, KeyRing, add_key, digest, labellers, main, read_entries, revoke_key
from server.store import ANONYMOUS


def test_a_revoked_key_is_refused_and_its_name_is_never_given_again(tmp_path, capsys):
    path = tmp_path / "api-keys.jsonl"
    mallory, alice = add_key(path, "mallory", ["label"]), add_key(path, "alice", ["label", "predict"])
    ring = KeyRing(path)
    assert ring.identify(mallory).name == "mallory"
    main(["--file", str(path), "--name", "mallory", "--revoke"])
    assert "revoked 1 key(s) named 'mallory'" in capsys.readouterr().out
    ring.checked -= 2  # as if a second went by
    assert ring.identify(mallory) is None and ring.identify(alice).name == "alice"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [entry["name"] for entry in entries] == ["mallory", "alice"] and entries[0]["revoked"].endswith("Z")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="revoked name is never given again"):
        add_key(path, "mallory", ["label"])
    with pytest.raises(SystemExit):
        main(["--file", str(path), "--name", "mallory"])
    assert "revoked name is never given again" in capsys.readouterr().err
    assert revoke_key(path, "mallory") == 0  # twice: done already
    with pytest.raises(ValueError, match="no key named 'nobody'"):
        revoke_key(path, "nobody")


def test_labellers_are_the_valid_keys_of_the_label_scope_only(tmp_path):
    path = tmp_path / "api-keys.jsonl"
    for name, scopes in (("alice", ["label"]), ("mallory", ["label"]), ("reader", ["predict"])):
        add_key(path, name, scopes)
    revoke_key(path, "mallory")
    # a line added by hand for the revoked name, and a broken line naming another: neither name is trusted
    lines = path.read_text().splitlines()
    lines.append(json.dumps({"name": "mallory", "sha256": digest("another key"), "scopes": ["label"]}))
    lines.append('{"name": "carol", "sha256": "not hex", "scopes": ["label"]}')
    path.write_text("\n".join(lines) + "\n")
    trusted = labellers(path)
    assert list(trusted) == ["alice"] and trusted["alice"] > 1.7e9  # with its creation time
    with pytest.raises(OSError):
        labellers(tmp_path / "missing.jsonl")


def old_parse_line(line: str) -> tuple[str, Identity]:
    """server.keys.parse_line as 6c10e62 shipped it, verbatim but for its name: the parser of a release that predates
    revocation, which a blue/green colour still running it, or a rollback to it, reads the same API_KEYS_FILE with.
    It knows no "revoked" field and ignores every field it does not know."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    name, sha, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not NAME.match(name) or name == ANONYMOUS:
        raise ValueError(f"bad name {name!r}")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"key {name!r}: sha256 must be 64 hex digits")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise ValueError(f"key {name!r}: scopes must be a non-empty list of {sorted(SCOPES)}")
    return sha, Identity(name, frozenset(scopes))


def old_identify(path, key: str) -> str | None:
    """The name 6c10e62's KeyRing gives `key` from the file at `path` (its refresh: a line parse_line refuses with
    ValueError is skipped, any other error escapes)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(old_parse_line(line))
        except ValueError:
            continue
    return next((identity.name for sha, identity in entries if sha == digest(key)), None)


def test_a_revoked_key_is_refused_by_the_previous_release_too(tmp_path):
    """Both blue/green colours read one API_KEYS_FILE, and a rollback runs the previous release's code: a revoked line
    must not carry the key's sha256, which a reader that knows no "revoked" field would accept."""
    path = tmp_path / "api-keys.jsonl"
    mallory, alice = add_key(path, "mallory", ["label"]), add_key(path, "alice", ["label", "predict"])
    assert old_identify(path, mallory) == "mallory"
    assert revoke_key(path, "mallory") == 1
    assert old_identify(path, mallory) is None and old_identify(path, alice) == "alice"  # the line skipped, no more
    assert KeyRing(path).identify(mallory) is None and KeyRing(path).identify(alice).name == "alice"
    entries, skipped = read_entries(path.read_text())
    assert not skipped and [(e.identity.name, e.valid) for e in entries] == [("mallory", False), ("alice", True)]
    assert list(labellers(path)) == ["alice"]
    with pytest.raises(ValueError, match="revoked name is never given again"):
        add_key(path, "mallory", ["label"])
    # a line revoked by the code before this fix still carries the sha256: revoking again takes it off
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps({**{k: v for k, v in record.items() if k != "revoked_sha256"}, "sha256": digest(mallory)})
    path.write_text("\n".join(lines) + "\n")
    assert old_identify(path, mallory) == "mallory" and KeyRing(path).identify(mallory) is None
    assert revoke_key(path, "mallory") == 0  # revoked already
    assert old_identify(path, mallory) is None and "sha256" not in json.loads(path.read_text().splitlines()[0])
