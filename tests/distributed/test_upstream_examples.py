"""Horovod's own example scripts (upstream examples/, unmodified, read from where the
tests are pointed: HVDTRAIN_HOROVOD_EXAMPLES or shared/upstream/horovod-examples beside
the checkout or a parent) through `entry:` on `hvdtrain run`, 2 CPU ranks: the
TensorFlow 2 ones were written for Keras 2 and run with `entry.keras: 2` (the tf-keras
package as tf.keras). The PyTorch ones need torchvision, which installs only beside
torch's CUDA build: they are for a GPU machine."""
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, hvdtrain

pytestmark = pytest.mark.distributed


def find_examples() -> Path | None:
    candidates = [os.environ.get("HVDTRAIN_HOROVOD_EXAMPLES")]
    candidates += [str(parent / "shared" / "upstream" / "horovod-examples") for parent in ROOT.parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "examples" / "tensorflow2").is_dir():
            return Path(candidate) / "examples"
    return None


def entry_spec(tmp_path, script: Path, args: list[str], keras: int, **horovod) -> Path:
    spec = {"name": script.stem.replace("_", "-"), "backend": "tensorflow",
            "entry": {"script": str(script), "args": args, "keras": keras},
            "resources": {"workers": 2, "cpus_per_worker": 1}, "output": str(tmp_path / "run")}
    if horovod:
        spec["horovod"] = horovod
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SMALL = ["--model", "MobileNetV2", "--batch-size", "8", "--num-batches-per-iter", "2", "--num-iters", "2",
         "--no-cuda"]


@pytest.mark.parametrize("script, args", [
    ("tensorflow2/tensorflow2_synthetic_benchmark.py", [*SMALL, "--num-warmup-batches", "1"]),
    ("tensorflow2/tensorflow2_keras_synthetic_benchmark.py", SMALL),
])
def test_horovods_keras_2_examples_run_unchanged(tmp_path, script, args, figure):
    from tests.conftest import missing
    examples = find_examples()
    if examples is None:
        missing("Horovod's examples not found (HVDTRAIN_HOROVOD_EXAMPLES, or shared/upstream/horovod-examples)")
    result = hvdtrain("run", entry_spec(tmp_path, examples / script, args, keras=2), timeout=900,
                      env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    total = re.search(r"Total img/sec on 2 CPU\(s\): ([\d.]+) \+-([\d.]+)", output)
    assert total and float(total.group(1)) > 0, output[-3000:]
    figure(f"Horovod's {Path(script).name} unchanged, Keras 2, 2 CPU ranks: {total.group(1)} img/s")


def test_horovods_elastic_keras_2_example_runs_unchanged(tmp_path, figure):
    """examples/elastic/tensorflow2: Horovod's elastic driver (horovodrun --min-np/--max-np
    with a discovery script, from horovod.elastic in the spec), the example's
    TensorFlowKerasState committed every batch, Keras 2."""
    from tests.conftest import missing
    examples = find_examples()
    if examples is None:
        missing("Horovod's examples not found (HVDTRAIN_HOROVOD_EXAMPLES, or shared/upstream/horovod-examples)")
    discovery = tmp_path / "discover.sh"
    discovery.write_text("#!/bin/sh\necho localhost:2\n")
    discovery.chmod(0o755)
    script = examples / "elastic" / "tensorflow2" / "tensorflow2_synthetic_benchmark_elastic.py"
    spec = entry_spec(tmp_path, script, [*SMALL, "--num-warmup-batches", "1"], keras=2,
                      elastic={"min_workers": 2, "max_workers": 2, "discovery": str(discovery)})
    result = hvdtrain("run", spec, timeout=900, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    total = re.search(r"Total img/sec on 2 CPU\(s\): ([\d.]+) \+-([\d.]+)", output)
    assert total and float(total.group(1)) > 0, output[-3000:]
    figure(f"Horovod's elastic {script.name} unchanged, Keras 2, 2 CPU ranks: {total.group(1)} img/s")
