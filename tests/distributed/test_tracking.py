"""log.mlflow against a real MLflow tracking server, started once for these tests
(`mlflow server` on localhost: a SQLite store, artifacts served by the server)."""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, missing, require_module
from tests.distributed.test_run import example

pytestmark = pytest.mark.distributed



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    require_module("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            missing(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)


def mlflow_run(uri: str, output: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((output / "mlflow.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def test_a_run_is_tracked_and_a_resumed_run_goes_on_in_it(cli, tmp_path, mlflow_server, figure):
    """2 ranks: the resolved spec as parameters, every epoch's record as metrics (step = epoch),
    curves.png, summary.json and the model as artifacts, status FINISHED; rerun with more
    epochs, the run resumes from its checkpoint and goes on in the same MLflow run."""
    out = tmp_path / "run"
    args = [example("mlp", "torch"), "-np", "2", f"output={out}", f"log.mlflow.tracking_uri={mlflow_server}",
            "log.mlflow.experiment=tracked-digits"]
    first = cli("run", *args, "train.epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    client, run = mlflow_run(mlflow_server, out)
    assert f"mlflow: run {run.info.run_id} at {mlflow_server}" in first.stdout
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-mlp-torch"
    assert client.get_experiment(run.info.experiment_id).name == "tracked-digits"
    params = run.data.params
    assert params["model.kind"] == "mlp" and params["train.epochs"] == "2" and params["backend"] == "torch"
    assert params["log.mlflow.tracking_uri"] == mlflow_server
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val_accuracy"])) for r in records]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "summary.json", "metrics.jsonl", "spec.yaml", "model"} <= artifacts
    assert any(a.path.startswith("model/") for a in client.list_artifacts(run.info.run_id, "model"))
    summary = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(summary.read_text()) == json.loads((out / "summary.json").read_text())

    again = cli("run", *args, "train.epochs=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    client, resumed = mlflow_run(mlflow_server, out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    # parameters are fixed once logged: the run keeps its first values
    assert resumed.data.params["train.epochs"] == "2"
    figure(f"mlflow: 2 ranks, digits MLP, 3 epochs in one MLflow run over a resume, final val_accuracy "
           f"{history[-1].value:.3f} after epoch 2")


def test_an_unreachable_tracking_server_is_bad_input(cli, tmp_path):
    require_module("mlflow")
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = cli("run", example("mlp", "torch"), "-np", "2", f"output={tmp_path / 'run'}",
                 f"log.mlflow.tracking_uri={dead}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"log.mlflow.tracking_uri {dead}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 120
