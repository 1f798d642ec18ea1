"""A job whose framework is not installed: exit 2 naming the package.

The environment is real: the interpreter runs without site-packages (-S) and
sees, through PYTHONPATH, every installed package except TensorFlow and Keras.
"""
import os
import site
import subprocess
import sys

from tests.conftest import ROOT

HIDDEN = ("tensorflow", "keras", "tf_keras", "tensorboard")


def env_without_tensorflow(tmp_path):
    farm = tmp_path / "site"
    farm.mkdir()
    for packages in site.getsitepackages():
        for entry in os.scandir(packages):
            if not entry.name.lower().startswith(HIDDEN) and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry.path)
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{farm}"}


def test_environment_really_lacks_tensorflow(tmp_path):
    env = env_without_tensorflow(tmp_path)
    probe = subprocess.run([sys.executable, "-S", "-c", "import numpy, torch, yaml; import tensorflow"],
                           env=env, capture_output=True, text=True)
    assert "No module named 'tensorflow'" in probe.stderr


def test_tensorflow_job_without_tensorflow_is_a_clear_error(tmp_path):
    env = env_without_tensorflow(tmp_path)
    spec = ROOT / "examples" / "digits-mlp-tf.yaml"
    for verb in ("run", "train"):
        result = subprocess.run([sys.executable, "-S", "-m", "hvdtrain", verb, str(spec),
                                 f"output={tmp_path / verb}"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (verb, result.stderr[-2000:])
        assert "needs tensorflow, which is not installed: pip install tensorflow-cpu==2.21.0" in result.stderr
        assert "Traceback" not in result.stderr


def test_keras_2_without_tf_keras_is_a_clear_error(tmp_path):
    """entry.keras 2 where the tf-keras package is missing: exit 2 naming it, before a launch
    (run) and in a rank (train)."""
    env = env_without_tensorflow(tmp_path)
    script = tmp_path / "script.py"
    script.write_text("print('never run')\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: old\nbackend: torch\nentry: {{script: {script}, keras: 2}}\noutput: {tmp_path / 'out'}\n")
    for verb in ("run", "train"):
        result = subprocess.run([sys.executable, "-S", "-m", "hvdtrain", verb, str(spec)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (verb, result.stderr[-2000:])
        assert "entry.keras 2 needs the tf-keras package, which is not installed: pip install tf-keras==2.21.0" \
            in result.stderr and "never run" not in result.stdout and "Traceback" not in result.stderr
