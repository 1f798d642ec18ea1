"""User code named by import path, `package.module:function` (torchtune's
`_component_`): model builders, losses, data loaders.

Import rules, the same on every launcher: the spec file's directory, the
working directory and the spec's `code` directories are importable, in that
order, before the installed packages.

`reference_problem` checks a reference without importing anything (so
`hvdtrain validate` needs neither torch nor TensorFlow, nor the user's module's
own imports): it finds the module's file on the import path and looks for the
name among the file's top-level definitions, following `from .x import *`.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

IMPORT_PATH = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
ADDED_PATHS: list[str] = []  # what add_import_paths put on sys.path in this process


def import_paths(spec_path: str | Path | None, code: list[Path]) -> list[str]:
    """The directories user code is imported from: the spec's, the working one, `code`."""
    dirs = [Path(spec_path).resolve().parent] if spec_path else []
    dirs += [Path.cwd(), *(Path(c).resolve() for c in code)]
    return list(dict.fromkeys(str(d) for d in dirs))


def add_import_paths(paths: list[str]) -> None:
    """Put paths first on sys.path, in order."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    ADDED_PATHS.extend(p for p in paths if p not in ADDED_PATHS)


def split(reference: str) -> tuple[str, str]:
    module, _, attribute = reference.partition(":")
    return module, attribute


# -- checking without importing -------------------------------------------------

def module_file(module: str, paths: list[str]) -> tuple[bool, Path | None]:
    """(found, its source file if it has one) for a module, looked up on paths +
    sys.path without importing any package on the way (importlib.util.find_spec
    would run each parent package's __init__)."""
    if module in sys.builtin_module_names:
        return True, None
    locations: list[str] | None = [*paths, *sys.path]
    spec = None
    for part in module.split("."):
        if locations is None:
            return False, None  # a plain module has no submodules
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return False, None
        locations = list(spec.submodule_search_locations or []) or None
    origin = getattr(spec, "origin", None)
    return True, Path(origin) if origin and origin not in ("built-in", "frozen") else None


def top_level_names(source: Path, module: str, paths: list[str], depth: int = 0) -> set[str] | None:
    """Names a module defines at its top level; None when that cannot be known
    without running it (a compiled module, or a star import from elsewhere)."""
    if source.suffix != ".py":
        return None
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name.split(".")[0])
                    continue
                base = resolve_relative(module, source, node)
                found = module_file(base, paths)[1] if base and depth < 8 else None
                more = top_level_names(found, base, paths, depth + 1) if found else None
                if more is None:
                    return None
                names |= more
        elif isinstance(node, (ast.If, ast.Try)):
            return None  # names defined conditionally: only running the module tells
    return names


def resolve_relative(module: str, source: Path, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    package = module.split(".") if source.name == "__init__.py" else module.split(".")[:-1]
    if node.level - 1 > len(package):
        return None
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def missing_module(module: str) -> str:
    return (f"module {module!r} not found (searched the spec's directory, the working "
            "directory, the spec's `code` directories and the installed packages)")


def reference_problem(reference: str, paths: list[str]) -> str | None:
    """Why `package.module:function` cannot be found, or None (found, or only
    running the module can tell)."""
    if not re.match(IMPORT_PATH, reference):
        return f"{reference!r} is not an import path of the form package.module:function"
    module, attribute = split(reference)
    found, source = module_file(module, paths)
    if not found:
        return missing_module(module)
    names = top_level_names(source, module, paths) if source else None
    first = attribute.split(".")[0]
    if names is not None and first not in names:
        return f"module {module!r} ({source}) has no {first!r}"
    return None


# -- loading and calling ----------------------------------------------------------

def load(reference: str, key: str) -> Callable[..., Any]:
    """Import the object a reference names (the user's directories are on sys.path
    through add_import_paths); any failure is a UserError naming key."""
    module, attribute = split(reference)
    try:
        target: Any = importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{key}: cannot import {module!r}: {err}") from None
    except Exception as err:  # the user's module failed while being imported
        raise UserError(f"{key}: importing {module!r} raised {type(err).__name__}: {err}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"{key}: module {module!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{key}: {reference} is a {type(target).__name__}, not callable")
    return target


def checked(factory: Callable[..., Any], positional: tuple, keywords: dict[str, Any], kind: type, key: str,
            reference: str) -> Any:
    """factory(*positional, **keywords), which must give a `kind`; any failure a UserError
    naming key (an optimizer class and the options given it in the spec)."""
    try:
        made = factory(*positional, **keywords)
    except Exception as err:
        given = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
        raise UserError(f"{key}: {reference}({given}) raised {type(err).__name__}: {err}") from None
    if not isinstance(made, kind):
        raise UserError(f"{key}: {reference} gave a {type(made).__name__}, not a "
                        f"{kind.__module__}.{kind.__name__}")
    return made


def call(function: Callable[..., Any], args: dict[str, Any], offered: dict[str, Any],
         key: str, reference: str) -> Any:
    """Call with the spec's args, plus each offered value whose name the
    function's signature names and the spec does not set. A **kwargs catch-all
    gets none: it often passes them on to something that does not take them
    (torchvision's resnet18(**kwargs) hands them to ResNet.__init__)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    named = {name for name, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    extra = {k: v for k, v in offered.items() if k not in args and k in named}
    try:
        return function(**args, **extra)
    except Exception as err:
        raise UserError(f"{key}: {reference} raised {type(err).__name__}: {err}") from None


def build_model(model, input_shape: tuple[int, ...], outputs: int) -> Any:
    """A custom model section's network: its builder called with its args, offered
    input_shape and num_classes (the model's outputs: classes, or 1 for regression)."""
    builder = load(model.builder, "model.builder")
    return call(builder, dict(model.args), {"input_shape": tuple(input_shape), "num_classes": outputs},
                "model.builder", model.builder)


def load_loss(reference: str) -> Callable[..., Any]:
    return load(reference, "loss")


def added_paths() -> list[str]:
    """The directories user code was imported from (recorded with an exported model)."""
    return list(ADDED_PATHS)
