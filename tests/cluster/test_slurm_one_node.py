"""sbatch --wait of rendered scripts on a real one-node Slurm cluster (2 tasks)."""
import json
import re
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.cluster
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


@pytest.mark.parametrize("mode", ["gloo", "mpi"])
def test_two_tasks_train_to_095(slurm_one_node, mode, figure):
    job, status, log = slurm_one_node.submit(MLP, f"one-{mode}", "--tasks-per-node", "2", "--mode", mode,
                                             "log.every_seconds=0.001")  # epochs here take ~0.05 s
    assert status == 0, log[-3000:]
    # srun's output is a file, not a terminal: rank 0's progress lines within the epochs
    progress = re.findall(r"^epoch \d+/20  step \d+/\d+  loss [\d.]+  \d+ samples/s  ETA \d+:\d\d:\d\d$", log, re.M)
    assert progress, log[-3000:]
    assert slurm_one_node.state(job) == "COMPLETED"
    summary = json.loads((slurm_one_node.jobs / f"one-{mode}" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"]["val_accuracy"] >= 0.95
    assert f"final validation accuracy {summary['final']['val_accuracy']:.4f}" in log
    figure(f"slurm one node {mode}: job {job} COMPLETED, accuracy {summary['final']['val_accuracy']:.4f}")


def test_failing_rank_ends_the_job_failed_with_its_message(slurm_one_node):
    bad = slurm_one_node.jobs / "bad.csv"  # passes the spec's checks, fails on loading
    bad.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    job, status, log = slurm_one_node.submit(MLP, "broken", "--tasks-per-node", "2",
                                             "data.source=file", f"data.path={bad}")
    assert status != 0
    assert slurm_one_node.state(job) == "FAILED"
    assert f"hvdtrain: error: {bad}:3: column 'b' holds 'oops', not a number" in log
    assert "Traceback" not in log


def test_mpi_type_this_open_mpi_cannot_use_gets_a_hint(slurm_one_node):
    script = slurm_one_node.hvdtrain("render", "slurm", MLP, "--tasks-per-node", "2", "--mode", "mpi",
                                     f"output={slurm_one_node.jobs / 'pmi2'}").stdout
    path = slurm_one_node.jobs / "pmi2.sbatch"
    path.write_text(script.replace("--mpi=pmix", "--mpi=pmi2"))
    proc = subprocess.run(["sbatch", "--parsable", "--wait", str(path)], env=slurm_one_node.env,
                          cwd=slurm_one_node.jobs, capture_output=True, text=True, timeout=300)
    job = proc.stdout.strip()
    log = next(slurm_one_node.jobs.glob(f"slurm-*-{job}.out")).read_text()
    assert proc.returncode != 0 and slurm_one_node.state(job) == "FAILED"
    assert "use `srun --mpi=pmix`" in log and "PMI-1/PMI-2" in log
    assert "OMPI was not built with SLURM's PMI support" not in log  # stopped before MPI_Init


def test_killed_task_ends_the_job_within_60s_naming_it(slurm_one_node, figure):
    script = slurm_one_node.jobs / "killed.sbatch"
    result = slurm_one_node.hvdtrain("submit", "slurm", MLP, "--tasks-per-node", "2", "-o", script,
                                     f"output={slurm_one_node.jobs / 'killed'}", "train.epochs=300")
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    log = slurm_one_node.jobs / f"slurm-digits-mlp-torch-{job}.out"
    deadline = time.monotonic() + 300
    while "epoch 2/300" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.5)
    [victim] = [p for p in psutil.process_iter(["cmdline"])
                if "hvdtrain" in (p.info["cmdline"] or []) and _env(p).get("SLURM_JOB_ID") == job
                and _env(p).get("SLURM_PROCID") == "1"]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    while slurm_one_node.state(job) in ("RUNNING", "COMPLETING", "PENDING"):
        assert time.monotonic() - killed_at < 90, "job still running 90s after the kill"
        time.sleep(0.5)
    seconds = time.monotonic() - killed_at
    figure(f"srun: job {job} {slurm_one_node.state(job)} {seconds:.1f}s after SIGKILL of task 1")
    assert slurm_one_node.state(job) == "FAILED" and seconds < 60
    assert "node1: task 1: Killed" in log.read_text()


def _env(process):
    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def test_users_own_script_runs_under_srun(slurm_one_node, figure):
    """An entry spec: each srun task runs the plain Horovod script, with Slurm's
    gloo rendezvous set up by the per-rank entry before it starts."""
    script = ROOT / "examples" / "plain_horovod_torch.py"
    result_file = slurm_one_node.jobs / "entry" / "result.json"
    job, status, log = slurm_one_node.submit(
        ROOT / "examples" / "plain-horovod-torch.yaml", "entry", "--tasks-per-node", "2",
        f"entry.script={script}", f"entry.args=[--epochs, '10', --out, {result_file}]")
    assert status == 0, log[-3000:]
    assert slurm_one_node.state(job) == "COMPLETED"
    outcome = json.loads(result_file.read_text())
    assert outcome["ranks"] == 2 and len(set(outcome["digests"])) == 1 and outcome["accuracy"] >= 0.93
    assert "epoch 10: loss" in log
    figure(f"slurm one node, plain Horovod script: job {job} COMPLETED, accuracy {outcome['accuracy']:.4f}")


def test_horovods_keras_2_example_runs_unchanged_under_srun(slurm_one_node, figure):
    """Horovod's tensorflow2_keras_synthetic_benchmark.py, read from the upstream examples,
    as 2 srun tasks with Slurm's gloo rendezvous, Keras 2 (entry.keras: 2)."""
    from tests.conftest import missing
    from tests.distributed.test_upstream_examples import SMALL, entry_spec, find_examples
    examples = find_examples()
    if examples is None:
        missing("Horovod's examples not found (HVDTRAIN_HOROVOD_EXAMPLES, or shared/upstream/horovod-examples)")
    spec = entry_spec(slurm_one_node.jobs, examples / "tensorflow2" / "tensorflow2_keras_synthetic_benchmark.py",
                      SMALL, keras=2)
    job, status, log = slurm_one_node.submit(spec, "keras2-example", "--tasks-per-node", "2")
    assert status == 0, log[-3000:]
    assert slurm_one_node.state(job) == "COMPLETED"
    total = re.search(r"Total img/sec on 2 CPU\(s\): ([\d.]+)", log)
    assert total and float(total.group(1)) > 0, log[-3000:]
    figure(f"slurm one node, Horovod's Keras 2 synthetic benchmark unchanged: job {job} COMPLETED, "
           f"{total.group(1)} img/s")


def test_warned_job_checkpoints_within_the_epoch_requeues_and_completes_on_the_uninterrupted_weights(
        slurm_one_node, figure):
    """USR1 to the batch script (what Slurm sends --signal seconds before the time limit
    or a preemption): the ranks stop after the same step, rank 0 checkpoints within the
    epoch, the script requeues the job, and the rerun resumes there and completes."""
    work = ["data.source=synthetic", "data.synthetic.samples=25000", "data.synthetic.shape=[16]",
            "model.hidden=[32]", "model.dropout=0.2", "train.epochs=2", "train.batch_size=8",
            "log.every_seconds=0.2"]
    whole = slurm_one_node.hvdtrain("run", MLP, "-np", "2", f"output={slurm_one_node.jobs / 'whole'}", *work)
    assert whole.returncode == 0, whole.stderr[-3000:]
    result = slurm_one_node.hvdtrain("submit", "slurm", MLP, "--tasks-per-node", "2", "-o",
                                     slurm_one_node.jobs / "warned.sbatch",
                                     f"output={slurm_one_node.jobs / 'warned'}", *work)
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    log = slurm_one_node.jobs / f"slurm-digits-mlp-torch-{job}.out"
    deadline = time.monotonic() + 300
    while not re.search(r"^epoch 1/2  step (\d{3,})/", log.read_text() if log.exists() else "", re.M):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_one_node.env, check=True)
    deadline = time.monotonic() + 300
    while slurm_one_node.state(job) != "COMPLETED":
        assert slurm_one_node.state(job) not in ("FAILED", "CANCELLED", "TIMEOUT"), log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    text = log.read_text()
    details = subprocess.run(["scontrol", "show", "job", job], env=slurm_one_node.env, capture_output=True,
                             text=True).stdout
    restarts = int(re.search(r"Restarts=(\d+)", details).group(1))
    stopped = re.search(r"stopping on request after step (\d+) of epoch 1", text)
    figure(f"slurm requeue: job {job} COMPLETED, Restarts={restarts}, stopped after step "
           f"{stopped.group(1) if stopped else '?'} of epoch 1")
    assert restarts == 1 and stopped, text[-3000:]
    assert f"requeueing job {job} (restart 1 of at most 3)" in text
    assert f"and {stopped.group(1)} steps of epoch 1" in text  # the rerun resumed at that step
    digest = {d: json.loads((slurm_one_node.jobs / d / "summary.json").read_text())["weights_digest"]
              for d in ("whole", "warned")}
    assert digest["warned"] == digest["whole"]
    shown = slurm_one_node.hvdtrain("status", slurm_one_node.jobs / "warned")
    assert shown.returncode == 0 and f"job {job}: COMPLETED  restarts 1" in shown.stdout, shown.stdout + shown.stderr
    logged = slurm_one_node.hvdtrain("logs", slurm_one_node.jobs / "warned", "-f")
    assert logged.returncode == 0 and logged.stdout == text


def test_a_sweep_is_one_job_array_with_a_run_directory_per_task(slurm_one_node, figure):
    """submit slurm --sweep: one array job, a task per value (one at a time here), each run
    in its own directory; `hvdtrain status` on the sweep's directory lists the tasks' states
    and each run's best val_loss, best first; status and logs also work on one run."""
    sweep_dir = slurm_one_node.jobs / "sweep"
    result = slurm_one_node.hvdtrain("submit", "slurm", MLP, "--tasks-per-node", "2", "--wait",
                                     "--sweep", "optimizer.lr=0.01,0.1", "--array-limit", "1",
                                     f"output={sweep_dir}", "train.epochs=3")
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert "#SBATCH --array=0-1%1" in (sweep_dir / "hvdtrain.sbatch").read_text()
    losses = {}
    for task, name in enumerate(("lr=0.01", "lr=0.1")):
        run = sweep_dir / name
        assert slurm_one_node.state(f"{job}_{task}") == "COMPLETED"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["workers"] == 2 and summary["epochs"] == 3
        assert yaml.safe_load((run / "spec.yaml").read_text())["optimizer"]["lr"] == float(name.split("=")[1])
        losses[name] = min(json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines())
        log = (slurm_one_node.jobs / f"slurm-digits-mlp-torch-{job}_{task}.out").read_text()
        assert "final validation accuracy" in log
        shown = slurm_one_node.hvdtrain("status", run)
        assert f"job {job}_{task}: COMPLETED" in shown.stdout, shown.stdout + shown.stderr
        assert slurm_one_node.hvdtrain("logs", run).stdout == log
    table = slurm_one_node.hvdtrain("status", sweep_dir)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    best_first = sorted(losses, key=losses.get)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(n, "COMPLETED", "3/3", f"{losses[n]:.4f}") for n in best_first]
    figure(f"slurm sweep: array job {job}, 2 tasks COMPLETED; best {best_first[0]} (val_loss {losses[best_first[0]]:.4f})")
