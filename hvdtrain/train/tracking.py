"""MLflow tracking (`log.mlflow`), from rank 0 only: the resolved spec as the run's
parameters, each epoch's record as metrics (step = epoch), and at the end
curves.png, summary.json and the exported model as artifacts. The MLflow run's id
is kept in the run directory, so a resumed run goes on in the same MLflow run.
metrics.jsonl stays the record: a tracking server that fails during training
costs a warning, not the run; one that cannot be reached at the start is bad
input (exit 2, naming it)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import UserError
from ..spec import JobSpec, MlflowSpec, dump

RUN_FILE = "mlflow.json"  # in the run directory: the tracking URI and the MLflow run's id
BATCH = 100  # MLflow's limit of parameters per request
VALUE_CHARS = 6000  # and of a parameter's value


def flat_parameters(spec: JobSpec) -> dict[str, str]:
    """The resolved spec as MLflow parameters: dotted keys, values as the spec writes them."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:VALUE_CHARS]

    walk("", yaml.safe_load(dump(spec)))
    return out


class Tracker:
    """One MLflow run, written by rank 0."""

    def __init__(self, section: MlflowSpec, spec: JobSpec, resumed: bool, say: Callable[[str], None]):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server fails in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("log.mlflow: the mlflow package is not installed "
                            "(pip install 'hvdtrain[mlflow]')") from None
        self.say, self.uri, self.failed = say, section.tracking_uri, False
        self.output = spec.run_dir
        self.client = MlflowClient(tracking_uri=self.uri)
        kept = self.output / RUN_FILE
        previous = json.loads(kept.read_text()) if resumed and kept.is_file() else {}
        try:
            if previous.get("tracking_uri") == self.uri:
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                logged = set(self.client.get_run(self.run_id).data.params)
            else:
                name = section.experiment or spec.name
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run = self.client.create_run(experiment_id, run_name=section.run_name or spec.name,
                                             tags={"hvdtrain.output": str(self.output.resolve())})
                self.run_id, logged = run.info.run_id, set()
            # parameters are fixed once logged: a resumed run adds only the new keys
            params = [Param(k, v) for k, v in flat_parameters(spec).items() if k not in logged]
            for first in range(0, len(params), BATCH):
                self.client.log_batch(self.run_id, params=params[first:first + BATCH])
        except Exception as err:  # noqa: BLE001 -- any failure of the client here is the URI's
            raise UserError(f"log.mlflow.tracking_uri {self.uri}: {first_line(err)}") from None
        kept.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")
        say(f"mlflow: run {self.run_id} at {self.uri}")

    def epoch(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(record["epoch"])) for key, value in record.items()
                   if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        self.guarded("metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def finish(self, status: str) -> None:
        """The run's files as artifacts (after a complete run), then its end status:
        FINISHED, KILLED (stopped on request: a rerun goes on) or FAILED."""
        if status == "FINISHED":
            for name in ("curves.png", "summary.json", "metrics.jsonl", "spec.yaml"):
                if (self.output / name).is_file():
                    self.guarded(name, lambda name=name: self.client.log_artifact(self.run_id, str(self.output / name)))
            if (self.output / "model").is_dir():
                self.guarded("model", lambda: self.client.log_artifacts(self.run_id, str(self.output / "model"), "model"))
        self.guarded("status", lambda: self.client.set_terminated(self.run_id, status=status))

    def guarded(self, what: str, call: Callable[[], Any]) -> None:
        """Training goes on without the tracking server: one warning, metrics.jsonl keeps all."""
        try:
            call()
        except Exception as err:  # noqa: BLE001 -- whatever the client raises
            if not self.failed:
                self.say(f"warning: mlflow at {self.uri} ({what}): {first_line(err)}; "
                         "training goes on, metrics.jsonl has every record")
            self.failed = True


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
