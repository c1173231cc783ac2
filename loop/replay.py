"""Replay a labelled folder as production traffic with feedback, to watch the feedback loop with your own photos.

Every photo under <folder>/<label>/ is sent to POST /predict, and for a share of them (--feedback-share, chosen by
a hash of the file's content, so the same photos every time) the folder's label goes back through POST /feedback
with the prediction_id the service issued. --mislabel-share sends the other label instead for a share of those
feedbacks: a careless or hostile user, whom `make harvest` should hold for review where the model was sure.

    make replay INPUT=photos/ URL=http://127.0.0.1:8000      # then: make harvest, make retrain

Run the service with FEEDBACK_DB and FEEDBACK_IMAGES set, or the photos are not kept and cannot be harvested. Set
API_KEY to a key of the `label` scope (make api-key) for labels that may train a model; without one the labels are
anonymous, and `make harvest` takes them only through a person's review.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deploy.client import predict, request
from deploy.evaluate import UsageError, labelled_photos, model_labels


def chosen(data: bytes, share: float, salt: str) -> bool:
    """A fixed pseudo-random choice per photo content: the same photos get feedback in every replay."""
    return int(hashlib.sha256(salt.encode() + data).hexdigest()[:16], 16) / 16**16 < share


def error_code(body: dict) -> str:
    error = body.get("error")
    return str(error.get("code", "")) if isinstance(error, dict) else ""


def replay_one(base_url: str, photo: Path, truth: str, labels: list[str], feedback_share: float,
               mislabel_share: float) -> list[str]:  # fmt: skip
    """Send one photo (and maybe its feedback); the outcomes to count."""
    data = photo.read_bytes()
    status, body = predict(base_url, data, photo.name)
    if status != 200:
        return [f"predict {status} {error_code(body)}".rstrip()]
    outcomes = ["predicted", "model right" if body["label"] == truth else "model wrong"]
    if not chosen(data, feedback_share, "feedback"):
        return outcomes
    label = truth
    if chosen(data, mislabel_share, "mislabel"):
        label = next(other for other in labels if other != truth)
        outcomes.append("mislabelled on purpose")
    payload = json.dumps({"prediction_id": body["prediction_id"], "label": label}).encode()
    status, answer = request(f"{base_url}/feedback", "POST", payload, {"Content-Type": "application/json"})
    outcomes.append(f"feedback {status} {error_code(answer)}".rstrip())
    return outcomes


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m loop.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("folder", type=Path, help="one folder per label: <folder>/<label>/*.jpg")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--feedback-share", type=float, default=1.0, help="share of predictions that get feedback")
    parser.add_argument("--mislabel-share", type=float, default=0.0, help="share of feedbacks with the wrong label")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for /ready")
    args = parser.parse_args(argv)
    base_url = args.url.rstrip("/")
    try:
        labels = model_labels(base_url, args.wait)
        photos = labelled_photos(args.folder, labels)
    except UsageError as error:
        print(f"loop.replay: {error}", file=sys.stderr)
        sys.exit(2)

    def one(item: tuple[Path, str]) -> list[str]:
        return replay_one(base_url, *item, labels, args.feedback_share, args.mislabel_share)

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        counts = Counter(outcome for outcomes in pool.map(one, photos) for outcome in outcomes)
    summary = {"photos": len(photos), **dict(sorted(counts.items()))}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
