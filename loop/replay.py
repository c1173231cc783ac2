"""Replay a labelled folder as production traffic with feedback, to watch the feedback loop with your own photos.

Every photo under <folder>/<label>/ is sent to POST /predict, and for a share of them (--feedback-share, chosen by
a hash of the file's content, so the same photos every time) the folder's label goes back through POST /feedback
with the prediction_id the service issued. --mislabel-share sends the other label instead for a share of those
feedbacks: a careless or hostile user, whom `make harvest` should hold for review where the model was sure.

    make replay INPUT=photos/ URL=http://127.0.0.1:8000      # then: make harvest, make retrain

Run the service with FEEDBACK_DB and FEEDBACK_IMAGES set, or the photos are not kept and cannot be harvested. Set
API_KEY to a key of the `label` scope (make api-key) for labels that may train a model; without one the labels are
anonymous, and `make harvest` takes them only through a person's review.

Progress goes to stderr: tqdm's bar on a terminal, else a plain line every --progress-s seconds (a log or a pipe
gets lines, not a bar's carriage returns). A 429 the client waited out (deploy.client, its Retry-After) is counted
under "waited out", apart from the photos; the summary is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from deploy.client import predict, request
from deploy.evaluate import UsageError, labelled_photos, model_labels

PROGRESS_S = 10.0  # seconds between progress lines when stderr is not a terminal
PHOTOS_FORMAT = "{n_fmt}/{total_fmt} photos [{elapsed}<{remaining}, {rate_fmt}]"
Waited = Callable[[str, float], None]  # (route, seconds): the client waits out a 429 on that route


def chosen(data: bytes, share: float, salt: str) -> bool:
    """A fixed pseudo-random choice per photo content: the same photos get feedback in every replay."""
    return int(hashlib.sha256(salt.encode() + data).hexdigest()[:16], 16) / 16**16 < share


def error_code(body: dict) -> str:
    error = body.get("error")
    return str(error.get("code", "")) if isinstance(error, dict) else ""


class Tally:
    """What the worker threads counted: each photo's outcomes, and each 429 the client waited out, by route."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.waits: Counter[str] = Counter({"predict 429": 0, "feedback 429": 0})
        self.seconds_waited = 0.0

    def waited(self, route: str, seconds: float) -> None:
        with self.lock:
            self.waits[f"{route} 429"] += 1
            self.seconds_waited += seconds

    def waited_out(self) -> dict[str, float]:
        with self.lock:
            return {**self.waits, "seconds": round(self.seconds_waited, 1)}

    def describe_waits(self) -> str:
        waits = self.waited_out()
        predicts, feedbacks = waits["predict 429"], waits["feedback 429"]
        return f"429s waited out: {predicts} predict, {feedbacks} feedback ({waits['seconds']:g} s)"


def replay_one(base_url: str, photo: Path, truth: str, labels: list[str], feedback_share: float,
               mislabel_share: float, waited: Waited) -> list[str]:  # fmt: skip
    """Send one photo (and maybe its feedback); the outcomes to count. `waited` hears of each 429 waited out."""
    data = photo.read_bytes()
    status, body = predict(base_url, data, photo.name, on_wait=lambda seconds: waited("predict", seconds))
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
    status, answer = request(f"{base_url}/feedback", "POST", payload, {"Content-Type": "application/json"},
                             on_wait=lambda seconds: waited("feedback", seconds))  # fmt: skip
    outcomes.append(f"feedback {status} {error_code(answer)}".rstrip())
    return outcomes


def replay_all(send: Callable[[tuple[Path, str]], list[str]], photos: list[tuple[Path, str]], tally: Tally,
               concurrency: int, progress_s: float, stream: TextIO) -> None:  # fmt: skip
    """Send every photo on `concurrency` threads, counting into `tally`; progress on `stream` (see the module's doc),
    also while every thread is waiting out a 429."""
    terminal = stream.isatty()
    bar = tqdm(total=len(photos), file=stream, unit="photo", mininterval=1, disable=not terminal)
    started = shown = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: set[Future[list[str]]] = {pool.submit(send, item) for item in photos}
        try:
            while pending:
                timeout = 1 if terminal else max(0.05, shown + progress_s - time.monotonic())
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    tally.outcomes.update(future.result())
                bar.set_postfix_str(tally.describe_waits(), refresh=not done)  # a wake with none done: waits shown
                bar.update(len(done))  # refreshes at most every mininterval
                if not terminal and (not pending or time.monotonic() - shown >= progress_s):
                    meter = tqdm.format_meter(len(photos) - len(pending), len(photos), time.monotonic() - started,
                                              unit="photo", bar_format=PHOTOS_FORMAT)  # fmt: skip
                    print(f"loop.replay: {meter}; {tally.describe_waits()}", file=stream, flush=True)
                    shown = time.monotonic()
        except BaseException:  # a failed request or Ctrl-C: the photos not started are not sent
            for future in pending:
                future.cancel()
            raise
        finally:
            bar.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loop.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("folder", type=Path, help="one folder per label: <folder>/<label>/*.jpg")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--feedback-share", type=float, default=1.0, help="share of predictions that get feedback")
    parser.add_argument("--mislabel-share", type=float, default=0.0, help="share of feedbacks with the wrong label")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for /ready")
    parser.add_argument("--progress-s", type=float, default=PROGRESS_S,
                        help="seconds between progress lines when stderr is not a terminal")  # fmt: skip
    args = parser.parse_args(argv)
    if args.progress_s <= 0:
        parser.error(f"--progress-s must be above 0, not {args.progress_s}")
    base_url = args.url.rstrip("/")
    try:
        labels = model_labels(base_url, args.wait)
        photos = labelled_photos(args.folder, labels)
    except UsageError as error:
        print(f"loop.replay: {error}", file=sys.stderr)
        sys.exit(2)

    tally = Tally()

    def one(item: tuple[Path, str]) -> list[str]:
        return replay_one(base_url, *item, labels, args.feedback_share, args.mislabel_share, tally.waited)

    replay_all(one, photos, tally, args.concurrency, args.progress_s, sys.stderr)
    summary = {"photos": len(photos), **dict(sorted(tally.outcomes.items())), "waited out": tally.waited_out()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
