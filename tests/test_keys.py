"""API keys: a revoked key's line stays, so its name is never given to another key (labels are recorded under the
name), the service refuses the key, and `make harvest` no longer takes its labels (server.keys.labellers)."""

from __future__ import annotations

import json

import pytest

from server.keys import KeyRing, add_key, labellers, main, revoke_key


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
    lines.append(lines[1].replace('"revoked"', '"was"'))
    lines.append('{"name": "carol", "sha256": "not hex", "scopes": ["label"]}')
    path.write_text("\n".join(lines) + "\n")
    trusted = labellers(path)
    assert list(trusted) == ["alice"] and trusted["alice"] > 1.7e9  # with its creation time
    with pytest.raises(OSError):
        labellers(tmp_path / "missing.jsonl")
