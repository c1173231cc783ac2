"""The MLflow run's `served_model` tag: which exported file a release ships (deploy.model_release reads it).

`python -m export.served [--models models]` tags the run of the model in that folder with the file the service would
serve from it (server.model_file's rule); `make export QUANTIZE=none` runs it once the int8 model is removed.
`export.quantize` sets the tag itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from export.evaluate import read_metadata
from server.model_file import choose_model_file
from training import tracking
from training.config import DEFAULT_PARAMS, load_params

SERVED_TAG = "served_model"


def tag_served(run_id: str | None, file_name: str) -> None:
    """Record on the run which of its `onnx/` artifacts is the one to serve."""
    if not run_id:
        return
    try:
        mlflow.MlflowClient().set_tag(run_id, SERVED_TAG, file_name)
    except mlflow.exceptions.MlflowException as error:
        print(f"warning: could not tag MLflow run {run_id} {SERVED_TAG}={file_name}: {error}", file=sys.stderr)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="the folder `make export` writes")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    tracking.configure(load_params(args.params).mlflow.experiment)
    chosen = choose_model_file(args.models)
    if not chosen.path.is_file():
        raise SystemExit(f"export.served: no model to serve in {args.models} (run make export)")
    run_id = read_metadata(chosen.path).get("run_id")
    tag_served(run_id, chosen.path.name)
    tagged = f"run {run_id} tagged {SERVED_TAG}={chosen.path.name}" if run_id else "the model names no MLflow run"
    print(f"served: {chosen.path} ({chosen.reason}); {tagged}")


if __name__ == "__main__":
    main()
