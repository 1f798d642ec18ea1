import importlib.util

import pytest
import yaml

from hvdtrain.errors import SpecError
from hvdtrain.spec import CNNSpec, MLPSpec, apply_override, load_spec, validate
from tests.conftest import EXAMPLES, ROOT

BASE = {"name": "job", "backend": "torch", "model": {"kind": "mlp"}, "data": {"source": "digits"}}


def problems(raw):
    with pytest.raises(SpecError) as info:
        validate(raw)
    return info.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_and_names_its_command(path):
    if path.name == "resnet18-torchvision.yaml" and importlib.util.find_spec("torchvision") is None:
        # torchvision's PyPI wheels need torch's CUDA build: not installed on CPU machines
        with pytest.raises(SpecError, match="model.builder: module 'torchvision.models' not found"):
            load_spec(path)
        spec = load_spec(path, check_paths=False)
    else:
        spec = load_spec(path)
    assert path.read_text().splitlines()[0] == f"# hvdtrain run examples/{path.name} -np 2"
    assert spec.name == path.stem


def test_defaults_resolve_output_and_checkpoint_dir():
    spec = validate(BASE)
    assert str(spec.output) == "runs/job"
    assert str(spec.checkpoint.dir) == "runs/job/checkpoints"
    assert isinstance(spec.model, MLPSpec) and spec.model.hidden == [128, 64]


def test_three_mistakes_are_reported_together_with_key_paths():
    raw = dict(BASE, optimizer={"lr": -1}, train={"epochs": "many"},
               model={"kind": "mlp", "dropout": 1.5})
    found = problems(raw)
    assert len(found) == 3
    assert any(p.startswith("optimizer.lr: ") and "greater than 0" in p and "-1" in p for p in found)
    assert any(p.startswith("train.epochs: ") for p in found)
    assert any(p.startswith("model.dropout: ") for p in found)


def test_unknown_key_suggests_nearest_valid_name():
    found = problems(dict(BASE, optimizer={"lrr": 0.1}))
    assert found == ["optimizer.lrr: unknown key (did you mean 'optimizer.lr'?)"]
    found = problems(dict(BASE, model={"kind": "cnn", "chanels": [8]}))
    assert found == ["model.chanels: unknown key (did you mean 'model.channels'?)"]


def test_unknown_top_level_key_lists_valid_keys_when_nothing_is_close():
    (found,) = problems(dict(BASE, zzzz=1))
    assert found.startswith("zzzz: unknown key (valid keys: name, backend, model")


def test_missing_required_sections_and_bad_choices():
    found = problems({"name": "x", "backend": "mxnet"})
    for key in ("model", "data"):
        assert f"{key}: required key is missing (or give `entry` to run your own script)" in found
    assert any(p.startswith("backend: ") and "'mxnet'" in p for p in found)


def test_cnn_needs_image_data():
    found = problems(dict(BASE, model={"kind": "cnn"}, data={"source": "iris"}))
    assert len(found) == 1 and "needs image data" in found[0]
    spec = validate(dict(BASE, model={"kind": "cnn"}))
    assert isinstance(spec.model, CNNSpec)


def test_compile_and_channels_last_are_torch_settings():
    spec = validate(dict(BASE, backend="torch", train={"compile": True, "channels_last": True}))
    assert spec.train.compile and spec.train.channels_last
    found = problems(dict(BASE, backend="tensorflow", train={"compile": True, "channels_last": True}))
    assert len(found) == 1 and "train.compile and train.channels_last: torch backend settings" in found[0]
    found = problems(dict(BASE, backend="tensorflow", train={"compile_mode": "max-autotune-no-cudagraphs"},
                          optimizer={"fused": True}))
    assert len(found) == 1 and "train.compile_mode and optimizer.fused: torch backend settings" in found[0]
    assert "compile_mode" in problems(dict(BASE, backend="torch", train={"compile_mode": "reduce-overhead"}))[0]


def test_file_source_needs_a_supported_path():
    assert "needs data.path" in problems(dict(BASE, data={"source": "file"}))[0]
    assert "must end in .npz, .csv or .npy" in problems(dict(BASE, data={"source": "file", "path": "x.txt"}))[0]


def test_overrides_are_typed_like_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    spec = load_spec(path, ["train.epochs=3", "optimizer.lr=0.05", "model.hidden=[32, 16]",
                            "horovod.fp16_compression=true"])
    assert spec.train.epochs == 3 and spec.optimizer.lr == 0.05
    assert spec.model.hidden == [32, 16] and spec.horovod.fp16_compression is True
    with pytest.raises(SpecError) as info:
        load_spec(path, ["train.epochs=abc", "optimizer.lrr=1"])
    assert len(info.value.problems) == 2
    assert any(p.startswith("train.epochs: ") for p in info.value.problems)


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_override_is_a_spec_error(item):
    with pytest.raises(SpecError, match="expected key.path=value"):
        apply_override({}, item)


def test_override_through_a_scalar_is_refused():
    with pytest.raises(SpecError, match="name is not a section"):
        apply_override({"name": "x"}, "name.sub=1")


@pytest.mark.parametrize("content, message", [
    (b"name: x\n  bad: [\n", "YAML syntax error at line 2"),
    (b"- a\n- b\n", "must be a YAML mapping"),
    (b"\xff\xfe\x00name", "not UTF-8"),
    (b"", "must be a YAML mapping"),
])
def test_unreadable_files_are_spec_errors(tmp_path, content, message):
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_cli_validate_reports_all_errors_with_exit_2_and_no_traceback(cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: job\nbackend: torch\nmodel: {kind: mlp, hiden: [8]}\n"
                    "data: {source: digits}\noptimizer: {lr: -1}\ntrain: {batch_size: 0}\n")
    result = cli("validate", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "(3 errors)" in result.stderr
    for key in ("model.hiden", "optimizer.lr", "train.batch_size"):
        assert f"  {key}: " in result.stderr


def test_cli_validate_prints_resolved_spec(cli):
    result = cli("validate", EXAMPLES[0], "train.epochs=7")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["epochs"] == 7
    assert resolved["checkpoint"]["dir"].endswith("/checkpoints")


def test_cli_run_rejects_bad_spec_before_launching(cli, tmp_path):
    result = cli("run", EXAMPLES[0], "train.epochs=-1", "-np", "2")
    assert result.returncode == 2 and "train.epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_task_and_loss_rules():
    spec = validate(dict(BASE, task="regression", data={"source": "diabetes"}))
    assert spec.loss == "mse"  # the task's default loss
    assert validate(BASE).loss == "cross_entropy"
    found = problems(dict(BASE, task="regression", loss="cross_entropy", data={"source": "diabetes"}))
    assert found == ["(top level): loss 'cross_entropy' (a classification loss) does not fit task "
                     "'regression': use one of mse, mae, huber or package.module:function"]
    assert "set task: regression" in problems(dict(BASE, data={"source": "diabetes"}))[0]
    assert "is a classification set" in problems(dict(BASE, task="regression"))[0]
    assert validate(dict(BASE, loss="mypkg.losses:focal")).loss == "mypkg.losses:focal"


def test_custom_model_and_entry_sections():
    found = problems(dict(BASE, model={"kind": "custom", "builder": "not a path"}))
    assert len(found) == 1 and found[0].startswith("model.builder: string should match pattern")
    entry = validate({"name": "job", "backend": "torch", "entry": {"module": "train", "args": ["-v"]}})
    assert entry.model is None and entry.entry.module == "train"
    both = problems({"name": "job", "backend": "torch", "entry": {"script": "a.py", "module": "a"}})
    assert both == ["entry: give exactly one of entry.script and entry.module"]


def test_missing_entry_script_and_code_dir_are_named(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "job", "backend": "torch", "entry": {"script": "nope.py"},
                                    "code": [str(tmp_path / "lib")]}))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.problems == [f"code.0: '{tmp_path / 'lib'}' is not a directory",
                                   "entry.script: 'nope.py' is not a file"]
    (tmp_path / "train_job.py").write_text("print('training')\n")
    cases = (("train_job", []), ("train_jobs", ["entry.module: module 'train_jobs' not found"]))
    for module, problems_found in cases:  # found in the spec's directory, or not at all
        spec.write_text(yaml.safe_dump({"name": "job", "backend": "torch", "entry": {"module": module}}))
        try:
            load_spec(spec)
            found = []
        except SpecError as err:
            found = [p.split(" (searched")[0] for p in err.problems]
        assert found == problems_found


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_resolved_spec_loads_again_as_it_was(backend):
    """What the launchers ship (the resolved spec, every default written out) validates
    again to the same spec: no default counts as a setting the backend refuses."""
    import yaml

    from hvdtrain.spec import dump
    spec = validate(dict(BASE, backend=backend))
    again = validate(yaml.safe_load(dump(spec)))
    assert again == spec


def test_mlflow_tracking_needs_a_uri_and_no_elastic_training():
    tracked = dict(BASE, log={"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    spec = validate(tracked)
    assert spec.log.mlflow.experiment is None and spec.log.mlflow.run_name is None
    assert "log.mlflow.tracking_uri" in problems(dict(BASE, log={"mlflow": {"experiment": "x"}}))[0]
    elastic = {"elastic": {"max_workers": 2, "discovery": "/bin/true"}}
    found = problems(dict(tracked, horovod=elastic))
    assert len(found) == 1 and "log.mlflow: not with elastic training" in found[0]



def test_only_a_writing_rank_probes_an_output_url(tmp_path, monkeypatch):
    """Rank 0 writes the run and its checkpoints: its load_spec probes an output URL with a
    write; the other ranks' (writes=False) do not, so they need no write access."""
    pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    overrides = ["output=s3://hvdtrain-nowhere/run"]
    with pytest.raises(SpecError, match="output: cannot write to s3://hvdtrain-nowhere/run"):
        load_spec(ROOT / "examples" / "digits-mlp-torch.yaml", overrides)
    spec = load_spec(ROOT / "examples" / "digits-mlp-torch.yaml", overrides, writes=False)
    assert spec.output == "s3://hvdtrain-nowhere/run"
