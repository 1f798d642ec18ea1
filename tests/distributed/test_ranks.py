"""Two gloo ranks under horovodrun, each running pytest on rank checks
(Horovod's own CI pattern)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvdtrain.launch.local import horovodrun_path
from tests.conftest import require_module

pytestmark = pytest.mark.distributed
RANKS = Path(__file__).parent / "ranks"


def run_on_two_ranks(checks: Path, tmp_path, **env):
    result = subprocess.run(
        [horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo",
         sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HVDTRAIN_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", **env})
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_two_ranks_train_identically(backend, tmp_path):
    code, output = run_on_two_ranks(RANKS / "fit_rank_checks.py", tmp_path, HVDTRAIN_TEST_BACKEND=backend)
    assert code == 0, output[-4000:]
    assert output.count("3 passed") == 2, output[-4000:]  # both ranks ran the three checks


def test_plain_horovod_code_on_keras3_objects(tmp_path):
    require_module("keras")
    code, output = run_on_two_ranks(RANKS / "keras3_rank_checks.py", tmp_path)
    assert code == 0, output[-4000:]
    assert output.count("8 passed") == 2, output[-4000:]


def test_horovod_tensorflow_keras_on_keras3(tmp_path):
    """DistributedOptimizer, the callbacks and KerasState with Keras 3's model.fit."""
    require_module("keras")
    code, output = run_on_two_ranks(RANKS / "horovod_keras_rank_checks.py", tmp_path)
    assert code == 0, output[-4000:]
    assert output.count("16 passed") == 2, output[-4000:]


@pytest.mark.parametrize("keras", [3, 2])
def test_hvd_load_model_keeps_a_distributed_optimizer(tmp_path, keras):
    """hvd.load_model on Keras 3 and on Keras 2 (tf-keras under TF_USE_LEGACY_KERAS=1)."""
    require_module("keras" if keras == 3 else "tf_keras")
    code, output = run_on_two_ranks(RANKS / "load_model_rank_checks.py", tmp_path,
                                    **({"TF_USE_LEGACY_KERAS": "1"} if keras == 2 else {}))
    assert code == 0, output[-4000:]
    assert output.count("2 passed") == 2, output[-4000:]


def run_example_on_two_ranks(name: str) -> subprocess.CompletedProcess:
    require_module("keras")
    script = Path(__file__).resolve().parents[2] / "examples" / name
    result = subprocess.run([horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo",
                             sys.executable, str(script)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "weights identical on all 2 ranks: True" in result.stdout
    return result


def test_horovod_keras_fit_example_trains_identically():
    """Written like Horovod's tensorflow2_keras_mnist.py: compile with hvd.DistributedOptimizer, fit."""
    result = run_example_on_two_ranks("plain_horovod_keras3_fit.py")
    assert "finished gradual learning rate warmup to 0.004" in result.stdout
    final = float(result.stdout.split("final accuracy (averaged over ranks)")[1].split(",")[0])
    assert final >= 0.9


def test_plain_horovod_keras3_example_trains_identically():
    result = run_example_on_two_ranks("plain_horovod_keras3.py")
    final = float(result.stdout.split("epoch 5: loss")[1].split("training accuracy")[1].split()[0])
    assert final >= 0.9


def test_horovod_torch_fixes_channels_last_sleeping_waits_and_buckets(tmp_path):
    code, output = run_on_two_ranks(RANKS / "horovod_torch_rank_checks.py", tmp_path)
    assert code == 0, output[-4000:]
    assert output.count("9 passed") == 2, output[-4000:]


def test_optimizer_state_broadcasts_for_every_torch_optimizer(tmp_path):
    code, output = run_on_two_ranks(RANKS / "horovod_optimizer_rank_checks.py", tmp_path)
    assert code == 0, output[-4000:]
    import torch
    optimizers = sum(1 for name in dir(torch.optim) if isinstance(getattr(torch.optim, name), type) and issubclass(
        getattr(torch.optim, name), torch.optim.Optimizer) and name not in ("Optimizer", "LBFGS", "SparseAdam"))
    assert optimizers >= 8 and output.count(f"{1 + 3 * optimizers} passed") == 2, output[-4000:]


def test_reducescatter_gradients_within_process_sets_for_every_dtype(tmp_path):
    require_module("tensorflow")
    code, output = run_on_two_ranks(RANKS / "horovod_process_sets_rank_checks.py", tmp_path)
    assert code == 0, output[-4000:]
    assert output.count("18 passed") == 2, output[-4000:]
