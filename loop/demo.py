"""`make loop-demo`: the feedback loop end to end on one labelled folder, to read its numbers.

The photos are split by a hash of their content: `--original-share` of them are the original data (prepared, a
model trained, exported and registered in a fresh MLflow store, made the first candidate by the champion rule's
bootstrap and deployed as CD would: the `champion`, what production runs), the rest are production traffic: replayed
through a real service process (`python -m server` with FEEDBACK_DB and FEEDBACK_IMAGES) with their folder's label
as feedback (`--mislabel-share` of the feedbacks wrong on purpose). Then `make harvest`'s code makes a data version
(`dvc add`), `make retrain`'s code trains the challenger and decides, and the folder FEEDBACK_IMAGES grew to is
reported against its cap (sampled every 0.2 s during the replay). Everything lands in --work; reports/loop.json
there sums it up.

    make loop-demo LOOP_PHOTOS=../shared/datasets/cats-vs-dogs-2k PRETRAINED=../shared/weights/mobilenet_v2_imagenet.pt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.serve import start_server
from deploy.client import free_port
from deploy.evaluate import labelled_photos
from deploy.model_release import follow
from export import convert, quantize
from loop import champion, harvest, replay, retrain
from server.images import LABELLED
from server.keys import add_key
from training import train
from training.config import load_params
from training.data import prepare

ROOT = Path(__file__).resolve().parents[1]


def split(photos: list[tuple[Path, str]], share: float) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(original, traffic) by a hash of each photo's content."""
    original, traffic = [], []
    for photo in photos:
        (original if replay.chosen(photo[0].read_bytes(), share, "loop:") else traffic).append(photo)
    return original, traffic


def lay_out(photos: list[tuple[Path, str]], root: Path) -> Path:
    """root/<label>/<name>, the layout prepare and replay read."""
    for path, label in photos:
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / label / path.name)
    return root


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*") if p.is_file()) if root.is_dir() else 0


@contextmanager
def service(model: Path, **env: str) -> Iterator[str]:
    """`python -m server` on a free port with the model and extra environment (bench.serve's start); its URL."""
    port = free_port()
    process, _ = start_server(model, port, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


Photos = list[tuple[Path, str]]  # (photo, label)


def replay_into(models: Path, traffic: Path, db: Path, kept: Path, cap: int, replay_args: list[str]
                ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Replay the traffic folder through a service keeping photos in `kept` (FEEDBACK_IMAGES_MAX_BYTES = cap), its
    labels given with a key of the label scope (a trusted labeller, made for the run in kept's parent); what replay
    counted, and the folder's size sampled every 0.2 s during the replay against its cap."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], folder_bytes(kept))

    watcher = threading.Thread(target=watch, daemon=True)
    keys = kept.parent / "api-keys.jsonl"
    keys.unlink(missing_ok=True)
    key = add_key(keys, "loop-demo", ["label"])
    env = {"FEEDBACK_DB": str(db), "FEEDBACK_IMAGES": str(kept), "FEEDBACK_IMAGES_MAX_BYTES": str(cap),
           "API_KEYS_FILE": str(keys)}  # fmt: skip
    with service(models, **env) as url, labelling_key(key):
        watcher.start()
        started = time.perf_counter()
        sent = replay.main([str(traffic), "--url", url, *replay_args])
        sent["seconds"] = round(time.perf_counter() - started, 1)
        done.set()
        watcher.join()
    end = folder_bytes(kept)
    return sent, {"cap_bytes": cap, "peak_bytes": max(peak[0], end), "end_bytes": end,
                  "photos_kept": len([p for p in kept.glob("*") if p.is_file()]),
                  "labelled_waiting_bytes": folder_bytes(kept / LABELLED)}  # fmt: skip


@contextmanager
def labelling_key(key: str) -> Iterator[None]:
    """API_KEY for deploy.client (how replay sends its labels) while the replay runs."""
    before = os.environ.get("API_KEY")
    os.environ["API_KEY"] = key
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("API_KEY")
        else:
            os.environ["API_KEY"] = before


def run(work: Path, original: Photos, traffic: Photos, params: Path, pretrained: str, *, quantize_to: str = "none",
        mislabel_share: float = 0.0, cap_bytes: int = 1 << 30, storage_cap: int = 0) -> dict[str, Any]:  # fmt: skip
    """The loop in `work` (its working directory: MLflow's artifacts go to work/mlruns). Returns the summary."""
    os.chdir(work)
    loaded = yaml.safe_load(params.read_text())
    processed = work / "data" / "processed"
    prepare(lay_out(original, work / "raw"), processed, work / "reports", labels=tuple(loaded["preprocess"]["labels"]),
            fractions=load_params(params).data.split, salt=loaded["data"]["split_salt"],
            preprocess=loaded["preprocess"])  # fmt: skip
    common = ["--params", str(params), "--data", str(processed)]
    models = work / "models"
    train.main([*common, "--pretrained", pretrained, "--out-dir", str(models), "--reports-dir", "reports"])
    convert.main([*common, "--checkpoint", str(models / "final.pt"), "--out", str(models / "model.onnx")])
    if quantize_to == "int8":
        quantize.main([*common, "--model", str(models / "model.onnx")])
    first = champion.main([*common, "--models", str(models), "--work", str(work / "build" / "champion"), "--bootstrap"])
    mlflow = loaded["mlflow"]  # production runs it: CD's --follow once its checks passed
    follow(mlflow["registered_model"], first["candidate"], mlflow["champion_alias"], mlflow["candidate_alias"])

    traffic_dir = lay_out(traffic, work / "traffic")
    db, kept = work / "feedback.db", work / "kept"
    sent, storage = replay_into(models, traffic_dir, db, kept, cap_bytes, ["--mislabel-share", str(mislabel_share)])
    if storage_cap:  # the same traffic again, predictions only, into a folder capped at storage_cap
        long = work / "storage"
        storage["small_cap"] = replay_into(models, traffic_dir, long / "feedback.db", long / "kept", storage_cap,
                                           ["--feedback-share", "0"])[1]  # fmt: skip

    feedback = work / "data" / "feedback"
    harvest.main(["--db", str(db), "--images", str(kept), "--out", str(feedback), "--params", str(params),
                  "--manifest", str(processed / "manifest.csv"), "--keys", str(work / "api-keys.jsonl")])  # fmt: skip
    dvc = [str(Path(sys.executable).parent / "dvc")]
    if not (work / ".dvc").is_dir():
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=work, check=True)
    subprocess.run([*dvc, "add", "-q", "data/feedback"], cwd=work, check=True)
    report = retrain.main([*common, "--feedback", str(feedback), "--pretrained", pretrained, "--quantize", quantize_to])
    summary = {
        "photos": {"original": len(original), "traffic": len(traffic)},
        "replay": sent,
        "feedback_images": storage,
        "harvest": json.loads((work / "reports" / "harvest.json").read_text()),
        "retrain": report,
    }
    (work / "reports" / "loop.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="one folder per label (cats/, dogs/, ...)")
    parser.add_argument("--work", type=Path, default=Path("build/loop-demo"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--pretrained", default=os.environ.get("PRETRAINED", "imagenet"))
    parser.add_argument("--original-share", type=float, default=0.5)
    parser.add_argument("--mislabel-share", type=float, default=0.02)
    parser.add_argument("--quantize", choices=["int8", "none"], default="none")
    parser.add_argument("--cap-bytes", type=int, default=1 << 30, help="FEEDBACK_IMAGES_MAX_BYTES for the replay")
    parser.add_argument("--storage-cap", type=int, default=16 << 20,
                        help="then the traffic again into a folder this size, to watch the cap (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    labels = yaml.safe_load(args.params.read_text())["preprocess"]["labels"]
    original, traffic = split(labelled_photos(args.photos.resolve(), labels), args.original_share)
    pretrained = str(Path(args.pretrained).resolve()) if Path(args.pretrained).is_file() else args.pretrained
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"  # a store of its own
    params = yaml.safe_load(args.params.read_text())  # its paths made absolute: the loop runs inside --work
    if params.get("pet"):
        params["pet"]["not_pets_dir"] = str((args.params.parent / params["pet"]["not_pets_dir"]).resolve())
    (args.work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = run(args.work.resolve(), original, traffic, (args.work / "params.yaml").resolve(), pretrained,
                  quantize_to=args.quantize, mislabel_share=args.mislabel_share, cap_bytes=args.cap_bytes,
                  storage_cap=args.storage_cap)  # fmt: skip
    decision, harvested = summary["retrain"]["decision"], summary["harvest"]["this_run"]
    print(json.dumps({"photos": summary["photos"], "replay": summary["replay"], "storage": summary["feedback_images"],
                      "harvest": {k: harvested[k] for k in ("used", "held_for_review", "left_out")},
                      "promoted": decision["promoted"], "reason": decision["reason"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
