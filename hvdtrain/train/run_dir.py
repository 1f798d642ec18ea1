"""The run directory: prepared when a run starts (its spec, the metrics the
checkpoint covers) and filled when it ends (the exported model, summary.json,
curves.png)."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from ..data import Dataset
from .. import storage
from ..errors import UserError, WriteError, writing
from ..spec import JobSpec, dump
from . import checkpoint, preempt
from .contract import Comm, Steps, alone
from .curves import CURVES, plot_runs
from .steer import Steering, monitored
from .validation import batch_size, evaluate, task_scores


FETCHED = ["metrics.jsonl", "mlflow.json"]  # what a rerun takes from an output URL before it goes on


def prepare_run_dir(spec: JobSpec, start_epoch: int) -> None:
    """Write the resolved spec; keep only metrics of epochs the checkpoint covers. With
    an output URL, what it holds of an earlier run comes first (a rerun on another node
    goes on with the same metrics and MLflow run)."""
    out = spec.run_dir
    out.mkdir(parents=True, exist_ok=True)
    if storage.is_url(spec.output):
        try:
            storage.download(spec.output, out, FETCHED)
        except Exception as err:  # noqa: BLE001 -- each store's library raises its own
            raise UserError(f"output: cannot read {spec.output}: {storage.describe(err)}") from None
    (out / preempt.MARKER).unlink(missing_ok=True)  # this run goes on from the stop
    (out / "spec.yaml").write_text(dump(spec))
    log = out / "metrics.jsonl"
    if log.exists():
        kept = [ln for ln in log.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("epoch", 0) <= start_epoch]
        log.write_text("".join(ln + "\n" for ln in kept))


def finish(spec: JobSpec, dataset: Dataset, comm: Comm, steps: Steps, record: dict,
           digest: str, steering: Steering | None = None) -> dict[str, Any]:
    """Rank 0 exports the model (with early stopping, the best epoch's) with its
    preprocessing, writes summary.json (why training stopped, the best epoch) and
    draws curves.png."""
    if not record:  # resumed after the last epoch: report the last checkpoint's metrics
        last = checkpoint.latest_valid(spec.checkpoint.dir) if comm.rank == 0 else None
        record = comm.broadcast_object(last.meta.get("metrics", {}) if last else {}, "hvdtrain.final")
    hosts = comm.allgather_object(socket.gethostname(), "hvdtrain.hosts")
    summary = {"name": spec.name, "backend": spec.backend, "workers": comm.size, "hosts": hosts,
               "epochs": spec.train.epochs, "parameters": steps.parameters, "final": record,
               "weights_digest": digest}
    if steering is not None:
        metric, _ = monitored(spec)
        summary["stopped"] = steering.stopped or f"all {spec.train.epochs} epochs done"
        summary["best"] = {"epoch": steering.best_epoch, "metric": metric, "value": steering.best_value}
    if comm.rank == 0:
        summary["exported_epoch"] = record.get("epoch")
        best = checkpoint.load_best(spec.checkpoint.dir) if spec.train.early_stopping is not None else None
        if best is not None:  # the weights of the best epoch, not the last
            steps.load_state_bytes(best.payload)
            summary["exported_epoch"] = best.epoch
        if dataset.test is not None:  # the exported model on the held-out split, rank 0 alone
            stats, loss = evaluate(dataset, alone(), steps, batch_size(spec), dataset.test)
            summary["test"] = {"samples": len(dataset.test), "loss": loss / len(dataset.test),
                               **task_scores(dataset, stats, loss / len(dataset.test))}
        model_dir = spec.run_dir / "model"
        with writing(model_dir):
            model_dir.mkdir(parents=True, exist_ok=True)
            steps.export(model_dir)
            dataset.preprocessing.save(model_dir / "preprocessing.json")
            (model_dir / "spec.yaml").write_text(dump(spec))
        with writing(spec.run_dir / "summary.json"):
            (spec.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if (spec.run_dir / "metrics.jsonl").is_file():
            plot_runs([spec.run_dir], spec.run_dir / CURVES)
        publish(spec, final=True)
    return summary


def publish(spec: JobSpec, final: bool = False) -> None:
    """Rank 0: copy the run directory to its output URL (nothing for a local output).
    At an epoch's end a failure costs a warning (the next epoch's copy, or the last,
    carries it); the last copy's failure stops the run, naming where the files are."""
    if not storage.is_url(spec.output):
        return
    try:
        storage.upload(spec.run_dir, spec.output)
    except Exception as err:  # noqa: BLE001 -- each store's library raises its own
        if final:
            raise WriteError(f"could not copy the run directory to {spec.output}: {storage.describe(err)}; "
                             f"its files are in {spec.run_dir} on this node") from None
        print(f"hvdtrain: warning: could not copy the run directory to {spec.output} "
              f"({storage.describe(err)}); trying again at the next epoch's end", file=sys.stderr, flush=True)
