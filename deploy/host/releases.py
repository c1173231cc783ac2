"""The release records of deploy/host/bluegreen.sh. It runs on the Docker host: python3's standard library only.

  releases.py candidate COLOUR                 proxy/COLOUR.json from the environment: IMAGE, IMAGE_ID, MODELS,
                                               MODEL_SHA256, MODEL_VERSION, COMMIT (the candidate now on COLOUR)
  releases.py record OUTCOME COLOUR [REASON]   one line appended to deployments.jsonl (the release from
                                               proxy/COLOUR.json, else from the environment); current.json too,
                                               first, unless OUTCOME is "failed" (current.json is the live
                                               release); once per SWITCH_ID and OUTCOME: a repeat appends nothing
  releases.py history                          current.json's line appended to deployments.jsonl when its switch
                                               is not there (a record killed between the two)
  releases.py live                             current.json's colour (nothing before the first switch)
  releases.py field COLOUR KEY                 one field of proxy/COLOUR.json
  releases.py switched TOKEN                   exit 0 when current.json records the switch TOKEN (its commit)
  releases.py previous                         what `bluegreen.sh rollback` brings back: "IMAGE<TAB>MODELS"

Outcomes: deployed (a switch to a new release), rolled-back (a switch to the previous one), reverted (a switch back
after a deploy failed its checks: that deploy does not count), failed (a candidate that never took traffic).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

FIELDS = ("image", "image_id", "models", "model_sha256", "model_version", "commit")
LIVE = ("deployed", "rolled-back", "reverted")


def from_environment() -> dict[str, str]:
    return {name: os.environ.get(name.upper(), "") for name in FIELDS}


def release_of(colour: str) -> dict[str, str]:
    path = Path("proxy") / f"{colour}.json"
    release = json.loads(path.read_text()) if path.exists() else from_environment()
    return {**release, "commit": os.environ.get("COMMIT") or release.get("commit", "")}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    temporary.replace(path)


def registered(models: str) -> object:
    """The release.json CD uploads beside the model (its registered version and run), when there is a valid one."""
    try:
        return json.loads((Path(models) / "release.json").read_text())
    except (OSError, ValueError):
        return None


def history() -> list[dict]:
    path = Path("deployments.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def recorded(line: dict) -> bool:
    """Whether deployments.jsonl holds the line's switch with its outcome (a switch's lines are recorded once)."""
    return bool(line["switch"]) and any(
        (old.get("switch"), old.get("outcome")) == (line["switch"], line["outcome"]) for old in history()
    )


def append(line: dict) -> None:
    if not recorded(line):
        with open("deployments.jsonl", "a") as lines:
            lines.write(json.dumps(line) + "\n")


def current() -> dict | None:
    path = Path("current.json")
    return json.loads(path.read_text()) if path.exists() else None


def record(outcome: str, colour: str, reason: str = "") -> None:
    release = release_of(colour)
    line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "outcome": outcome, "colour": colour,
            **{name: release.get(name, "") for name in FIELDS}, "reason": reason,
            "release": registered(release.get("models", "")),
            "switch": os.environ.get("SWITCH_ID", "")}  # fmt: skip
    if outcome != "failed":  # the commit first: a kill before the history line leaves it to `history`
        write_atomically(Path("current.json"), json.dumps(line) + "\n")
    append(line)


def previous() -> dict[str, str] | None:
    """The release that was live before the live one: a reverted deploy never counted, a rollback is a new live
    release (so a second rollback rolls forward again)."""
    lives: list[dict[str, str]] = []
    for line in history():
        if line["outcome"] in ("deployed", "rolled-back"):
            lives.append(line)
        elif line["outcome"] == "reverted" and lives:
            lives.pop()  # the deploy it undid
    return lives[-2] if len(lives) >= 2 else None


def main(argv: list[str]) -> int:
    command, *args = argv or ["help"]
    if command == "candidate" and len(args) == 1:
        write_atomically(Path("proxy") / f"{args[0]}.json", json.dumps(from_environment()) + "\n")
    elif command == "record" and len(args) in (2, 3):
        record(*args)
    elif command == "switched" and len(args) == 1:
        return 0 if (current() or {}).get("switch") == args[0] else 1
    elif command == "history" and not args:
        live = current()
        if live is not None and live.get("switch"):
            append(live)
    elif command == "live" and not args:
        print((current() or {}).get("colour", ""))
    elif command == "field" and len(args) == 2:
        print(release_of(args[0]).get(args[1], ""))
    elif command == "previous" and not args:
        release = previous()
        if release is None:
            print("no previous release to roll back to (deployments.jsonl)", file=sys.stderr)
            return 1
        print(f"{release['image']}\t{release['models']}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
