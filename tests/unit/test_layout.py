"""The package's layout rules: templates ship inside it (so any install renders),
the per-rank entry does not go through the CLI, TensorFlow's start-up notices
stay out of the terminal."""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hvdtrain.launch import k8s, slurm, template
from tests.conftest import ROOT

PACKAGE = ROOT / "hvdtrain"


@pytest.mark.parametrize("shipped, copy", [(slurm.TEMPLATE, ROOT / "slurm" / "hvdtrain.sbatch"),
                                           (k8s.TEMPLATE, ROOT / "k8s" / "mpijob.yaml")])
def test_the_copies_users_read_are_the_shipped_templates(shipped, copy):
    assert copy.read_text() == template(shipped), f"{copy} differs from hvdtrain/templates/{shipped}"


def test_the_rendered_trainer_examples_are_what_render_gives_today():
    from hvdtrain.launch import trainjob
    image = "registry.example/hvdtrain:latest"
    assert (ROOT / "k8s" / "horovod-runtime.yaml").read_text() == trainjob.render_runtime(image)
    assert (ROOT / "k8s" / "trainjob-digits-cnn-torch.yaml").read_text() == trainjob.render(
        ROOT / "examples" / "digits-cnn-torch.yaml", [], nodes=2, gpus_per_node=4, image=image)


def test_no_module_imports_the_cli_but_main():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            relative_cli = isinstance(node, ast.ImportFrom) and node.level and (
                module == "cli" or (module is None and "cli" in names) or (module or "").endswith(".cli"))
            if "hvdtrain.cli" in names or module == "hvdtrain.cli" or relative_cli:
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["hvdtrain/__main__.py"]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel (as `pip install .` builds it) and installed
    into a directory of its own, away from the checkout."""
    where = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(where / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (where / "dist").glob("hvdtrain-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                              "--target", str(where / "site"), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, where / "site"


def test_wheel_holds_the_templates(installed_wheel):
    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hvdtrain/templates/hvdtrain.sbatch", "hvdtrain/templates/mpijob.yaml",
            "hvdtrain/templates/trainjob.yaml", "hvdtrain/templates/horovod-runtime.yaml"} <= set(names)


@pytest.mark.parametrize("target, args", [
    ("slurm", ["examples/digits-mlp-torch.yaml"]),
    ("k8s", ["examples/digits-cnn-torch.yaml", "--workers", "2", "--image", "X"]),
    ("trainjob", ["examples/digits-cnn-torch.yaml", "--nodes", "2", "--image", "X", "--runtime"]),
])
def test_installed_wheel_renders(installed_wheel, tmp_path, target, args):
    _, site = installed_wheel
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = subprocess.run([sys.executable, "-c", "import hvdtrain; print(hvdtrain.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.stdout.startswith(str(site)), probe.stdout + probe.stderr  # not the checkout
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "render", target,
                             *[str(ROOT / a) if a.startswith("examples/") else a for a in args]],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = {"slurm": "srun --kill-on-bad-exit=1", "k8s": "kind: MPIJob",
                "trainjob": "kind: ClusterTrainingRuntime"}[target]
    assert expected in result.stdout


def import_tensorflow_backend(**env):
    code = "import hvdtrain.backends.tensorflow; import sys; print('imported', file=sys.stderr)"
    inherited = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**inherited, **env})


def test_tensorflow_start_up_notices_are_hidden_on_any_cpu():
    """oneDNN is forced on, so the notice is written on every x86-64 CPU (by default
    TensorFlow turns oneDNN on only on some, such as recent Intel Xeons)."""
    shown = import_tensorflow_backend(TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="0")
    assert "oneDNN custom operations are on" in shown.stderr  # the notice exists: this test can fail
    result = import_tensorflow_backend(TF_ENABLE_ONEDNN_OPTS="1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "imported\n"


DATA_LAYERS = {"types": 0, "split": 1, "sharding": 1, "npy": 2, "transforms": 2, "folder_index": 2,
               "shard_index": 2, "image_samples": 3, "arrays": 4, "images": 4, "shards": 4, "tables": 4, "text": 4, "custom": 4,
               "write_shards": 5, "__init__": 5}


def upward_imports(package: str, layers: dict[str, int]) -> list[str]:
    """The imports of a package's modules that reach a module of their own layer or above."""
    found = {path.stem for path in (PACKAGE / package).glob("*.py")}
    assert found == set(layers)
    upward = []
    for name, layer in layers.items():
        for node in ast.walk(ast.parse((PACKAGE / package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                upward += [f"{name} -> {t}" for t in targets if layers[t.split(".")[0]] >= layer]
    return upward


def test_data_modules_import_only_the_layers_below_them():
    """hvdtrain/data: types <- split, sharding <- npy, transforms, indexes <- image_samples <- readers
    <- the table."""
    assert upward_imports("data", DATA_LAYERS) == []


TRAIN_LAYERS = {"contract": 0, "checkpoint": 0, "preempt": 0, "metrics": 0, "startup": 0, "lr": 1, "steer": 1,
                "watchdog": 1, "progress": 1, "curves": 1, "tracking": 1, "preflight": 2, "resume": 2, "validation": 2, "epoch_end": 3,
                "run_dir": 4, "loop": 5, "elastic": 6, "__init__": 7}


def test_train_modules_import_only_the_layers_below_them():
    """hvdtrain/train: the contract at the bottom, the loop and elastic training at the top."""
    assert upward_imports("train", TRAIN_LAYERS) == []


def import_graph() -> dict[str, set[str]]:
    """Every module of hvdtrain and the modules of hvdtrain it imports, at the top or
    inside a function (a lazy import is a dependency all the same). `from . import x`
    of a submodule x depends on x, not on the package."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules = {name_of(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module] if node.level and node.module
                                else here[:len(here) - node.level + 1] if node.level else [node.module])
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                found.update(subs + ([base] if len(subs) < len(node.names) else []))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop."""
    reach = {m: set() for m in graph}
    for start in graph:
        pending = list(graph[start])
        while pending:
            m = pending.pop()
            if m not in reach[start]:
                reach[start].add(m)
                pending.extend(graph[m])
    groups = {frozenset([m] + [o for o in reach[m] if m in reach[o]]) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert graph["hvdtrain.train.loop"] >= {"hvdtrain.train.contract", "hvdtrain.data"}  # the graph is read
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and found


def test_every_data_source_has_a_reader():
    import typing

    from hvdtrain.data import READERS
    from hvdtrain.spec import DataSpec
    assert set(READERS) == set(typing.get_args(DataSpec.model_fields["source"].annotation))


def test_no_module_defines_a_name_twice():
    """A second top-level def of a name silently replaces the first for every caller."""
    twice = []
    for path in PACKAGE.rglob("*.py"):
        names = [node.name for node in ast.parse(path.read_text()).body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        twice += [f"{path.relative_to(PACKAGE)}: {name}" for name in sorted(set(names)) if names.count(name) > 1]
    assert twice == []


def test_cli_and_the_rank_entry_name_no_launcher_and_every_launcher_verb_is_a_command():
    """Launchers come from one table: cli.py and rank.py import `hvdtrain.launch` alone."""
    from hvdtrain.cli import parser
    from hvdtrain.launch import LAUNCHERS
    graph = import_graph()
    for module in ("hvdtrain.cli", "hvdtrain.rank"):
        assert [m for m in graph[module] if m.startswith("hvdtrain.launch.")] == [], module
    top = parser()
    for launcher in LAUNCHERS.values():
        for verb in launcher.verbs:
            args = top.parse_args([*verb.path, *REQUIRED[verb.path]])
            assert args.func is verb.call, verb.path
    assert {v.path for launcher in LAUNCHERS.values() for v in launcher.verbs} >= {
        ("run",), ("render", "slurm"), ("submit", "slurm"), ("render", "k8s"), ("render", "trainjob")}


REQUIRED = {("run",): ["s.yaml"], ("render", "slurm"): ["s.yaml"], ("submit", "slurm"): ["s.yaml"],
            ("status",): ["runs/x"], ("logs",): ["runs/x"], ("render", "k8s"): ["s.yaml", "--image", "i",
            "--workers", "1"], ("render", "trainjob"): ["s.yaml", "--image", "i", "--nodes", "1"],
            ("render", "runtime"): ["--image", "i"]}


def test_no_module_is_over_450_lines():
    """Modules split by responsibility before they grow past a screenful of screens
    (horovod_build/fixes.py is a list of data: Horovod's edits, one reason each)."""
    long = [f"{p.relative_to(PACKAGE)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450 and p.name != "fixes.py"]
    assert long == []
