"""Sweeps: the grid, each run's overrides and directory, the Slurm job array, the status table."""
import json
from pathlib import Path

import pytest

from hvdtrain.errors import SpecError, UserError
from hvdtrain.launch import slurm, sweep
from tests.conftest import ROOT

MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


def test_values_split_at_commas_outside_brackets():
    assert sweep.values_of("optimizer.lr=0.1, 0.01") == ("optimizer.lr", ["0.1", "0.01"])
    assert sweep.values_of("model.hidden=[64,32],[128]") == ("model.hidden", ["[64,32]", "[128]"])
    for bad in ("optimizer.lr", "=1,2", "optimizer.lr=", "optimizer.lr=1,,2", "optimizer.lr=1,1"):
        with pytest.raises(UserError, match="--sweep"):
            sweep.values_of(bad)


def test_the_grid_gives_each_run_its_overrides_and_directory(tmp_path):
    base, runs = sweep.plan(str(MLP), [f"output={tmp_path}"], ["optimizer.lr=0.1,0.01", "train.batch_size=16,32"])
    assert base.output == tmp_path
    assert [r.name for r in runs] == ["lr=0.1,batch_size=16", "lr=0.1,batch_size=32",
                                      "lr=0.01,batch_size=16", "lr=0.01,batch_size=32"]
    assert runs[1].overrides == ["optimizer.lr=0.1", "train.batch_size=32", f"output={tmp_path / runs[1].name}"]
    # keys with the same last part are named in full
    _, runs = sweep.plan(str(MLP), [], ["optimizer.lr=0.1", "optimizer.warmup_epochs=0,1"])
    assert [r.name for r in runs] == ["lr=0.1,warmup_epochs=0", "lr=0.1,warmup_epochs=1"]


def test_runs_share_no_checkpoint_directory_the_spec_names(tmp_path):
    """Each run resumes from its checkpoint directory: one named in the spec gets a directory
    per run under it (a URL likewise, by storage.join); unnamed, each run's is under its output."""
    where = tmp_path / "ckpt"
    _, runs = sweep.plan(str(MLP), [f"output={tmp_path}", f"checkpoint.dir={where}"], ["optimizer.lr=0.1,0.01"])
    dirs = [sweep.load_spec(str(MLP), [f"checkpoint.dir={where}", *r.overrides]).checkpoint.dir for r in runs]
    assert dirs == [where / "lr=0.1", where / "lr=0.01"]
    _, runs = sweep.plan(str(MLP), [f"output={tmp_path}"], ["optimizer.lr=0.1,0.01"])
    assert not any(o.startswith("checkpoint.dir=") for r in runs for o in r.overrides)
    dirs = [sweep.load_spec(str(MLP), r.overrides).checkpoint.dir for r in runs]
    assert dirs == [tmp_path / "lr=0.1" / "checkpoints", tmp_path / "lr=0.01" / "checkpoints"]


def test_a_bad_value_stops_the_sweep_before_any_run_naming_it(tmp_path):
    with pytest.raises(SpecError, match="optimizer.lr"):
        sweep.plan(str(MLP), [f"output={tmp_path}"], ["optimizer.lr=0.1,-1"])
    with pytest.raises(UserError, match="a key is given twice"):
        sweep.plan(str(MLP), [], ["optimizer.lr=0.1", "optimizer.lr=0.2"])
    with pytest.raises(UserError, match="--sweep output"):
        sweep.plan(str(MLP), [], ["output=a,b"])
    assert not list(tmp_path.iterdir())


def test_a_sweep_is_one_slurm_job_array(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, runs = sweep.plan(str(MLP), ["output=sw"], ["optimizer.lr=0.1,0.01"])
    script = slurm.render(spec, MLP, ["output=sw"], sweep=runs, array_limit=1)
    assert "#SBATCH --array=0-1%1\n" in script and "#SBATCH --output=slurm-%x-%A_%a.out\n" in script
    assert "    1) run_args=(optimizer.lr=0.01 output=sw/lr=0.01); " \
           f"run_marker={tmp_path}/sw/lr=0.01/.preempted ;;" in script
    assert 'output=sw "${run_args[@]}" &' in script and 'if [ -f "$run_marker" ]; then' in script
    plain = slurm.render(spec, MLP, ["output=sw"])
    assert "--array" not in plain and "run_args" not in plain and "slurm-%x-%j.out" in plain
    with pytest.raises(UserError, match="--array-limit"):
        slurm.render(spec, MLP, [], array_limit=2)


def test_status_lists_the_runs_best_first(tmp_path):
    spec, runs = sweep.plan(str(MLP), [f"output={tmp_path}"], ["optimizer.lr=0.3,0.1,0.01"])
    directory = sweep.write_plan(spec, runs, str(MLP), [f"output={tmp_path}"], "local")
    losses = {"lr=0.3": [0.9, 0.7], "lr=0.1": [0.5, 0.2, 0.3], "lr=0.01": None}
    for run in runs:
        out = Path(run.output)
        if losses[run.name] is None:
            continue
        out.mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "val_loss": v}) + "\n"
                                                   for e, v in enumerate(losses[run.name])))
        if run.name == "lr=0.1":
            (out / "summary.json").write_text(json.dumps({"epochs": 20}))
    rows = sweep.table(directory).splitlines()
    assert rows[0].split() == ["run", "state", "epochs", "best", "val_loss"]
    assert [r.split() for r in rows[1:]] == [["lr=0.1", "done", "3/20", "0.2000"],
                                             ["lr=0.3", "started", "2/20", "0.7000"],
                                             ["lr=0.01", "not", "started", "0/20", "-"]]
    assert "RUNNING" in sweep.table(directory, {"lr=0.3": "RUNNING"})


def test_logs_of_a_sweep_are_each_runs_log_under_its_name(tmp_path, capsys):
    """The sweep's own directory records a log pattern of the array, not a file: each run's
    log is printed under a line naming the run; following takes one run."""
    from argparse import Namespace
    spec, runs = sweep.plan(str(MLP), [f"output={tmp_path}"], ["optimizer.lr=0.1,0.01,0.001"])
    directory = sweep.write_plan(spec, runs, str(MLP), [f"output={tmp_path}"], "slurm")
    (directory / slurm.JOB_RECORD).write_text(json.dumps({"job": "7", "log": str(tmp_path / "slurm-x-7_*.out")}))
    for i, run in enumerate(runs[:2]):  # the third run was never submitted
        Path(run.output).mkdir()
        log = tmp_path / f"slurm-x-7_{i}.out"
        log.write_text(f"epoch 1/1 of {run.name}\n")
        (Path(run.output) / slurm.JOB_RECORD).write_text(json.dumps({"job": f"7_{i}", "log": str(log)}))
    assert slurm.print_logs(Namespace(run_dir=str(directory), follow=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"== lr=0.1 ({runs[0].output})" and lines[1] == "epoch 1/1 of lr=0.1"
    assert lines[2] == f"== lr=0.01 ({runs[1].output})" and lines[3] == "epoch 1/1 of lr=0.01"
    assert lines[4].startswith("== lr=0.001") and "no Slurm job recorded" in lines[5] and len(lines) == 6
    with pytest.raises(UserError, match=r"sweep of 3 runs: follow one of them, e\.g\. hvdtrain logs -f .*lr=0\.1"):
        slurm.print_logs(Namespace(run_dir=str(directory), follow=True))
