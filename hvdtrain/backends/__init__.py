"""Backends by the spec's `backend` value. Each module exposes the same
functions: `build_model`, `fit(spec, dataset)` and `load_model(model_dir)`.
Frameworks are imported only when a backend is asked for."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

from ..errors import UserError

BACKENDS = {"torch": "hvdtrain.backends.torch", "tensorflow": "hvdtrain.backends.tensorflow"}
FRAMEWORK_MODULES = {"torch": ("torch",), "tensorflow": ("tensorflow", "keras")}


def framework_requirement(backend: str) -> str:
    """The pip requirement of a backend's framework, as the package's extra of the
    same name pins it (pyproject.toml is the one place the versions are written)."""
    try:
        requirements = importlib.metadata.requires("hvdtrain") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        package, _, marker = requirement.partition(";")
        if marker.replace("'", '"').split() == ["extra", "==", f'"{backend}"']:
            return package.strip()
    return FRAMEWORK_MODULES[backend][0]


FRAMEWORK_PACKAGES = {name: framework_requirement(name) for name in BACKENDS}


def require_framework(name: str) -> None:
    """Before launching ranks: the backend's framework is installed (found, not imported)."""
    for module in FRAMEWORK_MODULES.get(name, ()):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"backend {name!r} needs {module}, which is not installed: "
                            f"pip install {FRAMEWORK_PACKAGES[name]}")


KERAS2_PACKAGE = "tf-keras==2.21.0"  # Keras 2 for TensorFlow 2.21, as tf.keras with TF_USE_LEGACY_KERAS=1


def keras_environment(keras: int) -> dict[str, str]:
    """The variables that give a script the Keras it asks for (entry.keras): Keras 2 is
    the tf-keras package, which must be installed (found, not imported)."""
    if keras == 3:
        return {}
    if importlib.util.find_spec("tf_keras") is None:
        raise UserError(f"entry.keras 2 needs the tf-keras package, which is not installed: "
                        f"pip install {KERAS2_PACKAGE}")
    return {"TF_USE_LEGACY_KERAS": "1"}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("torch", "tensorflow", "keras"):
            raise UserError(f"backend {name!r} needs {err.name}, which is not installed: "
                            f"pip install {FRAMEWORK_PACKAGES[name]}") from None
        if err.name and err.name.startswith("hvdtrain.backends."):
            raise UserError(f"backend {name!r} is not available in this version of hvdtrain") from None
        raise


def import_horovod(framework: str) -> ModuleType:
    """horovod.torch / horovod.tensorflow, or a clear way to get it."""
    try:
        return importlib.import_module(f"horovod.{framework}")
    except ImportError as err:
        raise UserError(f"Horovod for {framework} is not usable here ({err}); build and install "
                        "it with: hvdtrain build-horovod") from None
