"""Sweeps: `--sweep key=v1,v2` (repeatable: the grid of every combination) on
`hvdtrain run` (one run after another) and `render/submit slurm` (one Slurm job
array). Each run has its overrides and its own run directory under the spec's
output; `sweep.json` there lists them, and `hvdtrain status` on that directory
prints one row per run with its state and headline metric, best first."""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import storage
from ..errors import UserError
from ..spec import JobSpec, load_spec

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepRun:
    name: str  # its directory under the sweep's, e.g. lr=0.1,batch_size=32
    overrides: list[str]  # the sweep's values and its output, after the command line's overrides
    output: str


def values_of(text: str) -> tuple[str, list[str]]:
    """`key.path=v1,v2,...`: the key and its values (commas inside [] or {} stay in a value)."""
    key, sep, rest = text.partition("=")
    if not sep or not key.strip() or not rest.strip():
        raise UserError(f"--sweep {text!r}: write key.path=value1,value2,...")
    values, depth, current = [], 0, ""
    for char in rest:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if any(not v for v in values) or len(set(values)) < len(values):
        raise UserError(f"--sweep {text!r}: a value is empty or given twice")
    return key.strip(), values


def plan(spec_path: str, overrides: list[str], sweeps: list[str]) -> tuple[JobSpec, list[SweepRun]]:
    """The sweep's base spec and its runs, each spec checked now (a bad value stops the
    sweep before any run starts, naming the key)."""
    axes = [values_of(s) for s in sweeps]
    keys = [k for k, _ in axes]
    if len(set(keys)) < len(keys):
        raise UserError(f"--sweep: a key is given twice ({', '.join(keys)})")
    if any(k == "output" for k in keys):
        raise UserError("--sweep output: each run's output is a directory under the spec's output")
    base = load_spec(spec_path, overrides)
    if storage.is_url(base.output):
        raise UserError(f"--sweep: output {base.output} is a URL; a sweep's runs need a local directory "
                        "(checkpoint.dir may be a URL)")
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys
    runs = []
    for combination in itertools.product(*(values for _, values in axes)):
        name = ",".join(f"{label}={safe(value)}" for label, value in zip(labels, combination))
        output = str(Path(base.output) / name)
        extra = [f"{k}={v}" for k, v in zip(keys, combination)] + [f"output={output}"]
        if str(base.checkpoint.dir) != str(storage.join(base.output, "checkpoints")) and "checkpoint.dir" not in keys:
            # a checkpoint directory the spec names is shared by no two runs: each would resume the other's
            extra.append(f"checkpoint.dir={storage.join(base.checkpoint.dir, name)}")
        load_spec(spec_path, [*overrides, *extra])  # SpecError names the key and value
        runs.append(SweepRun(name, extra, output))
    return base, runs


def safe(value: str) -> str:
    """A value as part of a directory name."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", value).strip("_") or "_"


def write_plan(base: JobSpec, runs: list[SweepRun], spec_path: str, overrides: list[str],
               launcher: str, **extra) -> Path:
    directory = Path(base.output)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_FILE).write_text(json.dumps(
        {"spec": str(Path(spec_path).resolve()), "overrides": overrides, "launcher": launcher,
         "runs": [asdict(r) for r in runs], **extra}, indent=2) + "\n")
    return directory


def is_sweep(directory: Path) -> bool:
    return (Path(directory) / SWEEP_FILE).is_file()


def table(directory: Path, states: dict[str, str] | None = None) -> str:
    """One row per run: its state, epochs, and headline metric (the one that names the best
    epoch: train.early_stopping's or train.target's metric, else val_loss), best first.
    states: each run's state where a scheduler knows it (a Slurm array's tasks)."""
    from ..train.steer import monitored
    record = json.loads((Path(directory) / SWEEP_FILE).read_text())
    spec = load_spec(record["spec"], record["overrides"])
    metric, larger = monitored(spec)
    rows = []
    for run in record["runs"]:
        out = Path(run["output"])
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        records = [json.loads(line) for line in lines if line.strip()]
        state = (states or {}).get(run["name"]) or ("done" if summary else "started" if records else "not started")
        values = [r[metric] for r in records if metric in r]
        best = (max if larger else min)(values) if values else None
        total = load_spec(record["spec"], [*record["overrides"], *run["overrides"]]).train.epochs
        epochs = f"{records[-1]['epoch'] if records else 0}/{total}"
        rows.append((run["name"], state, epochs, best))
    rows.sort(key=lambda r: (r[3] is None, -(r[3] or 0) if larger else (r[3] or 0)))
    width = max([len("run")] + [len(r[0]) for r in rows])
    head = f"{'run':<{width}}  {'state':<12} {'epochs':>7}  best {metric}"
    body = [f"{name:<{width}}  {state:<12} {epochs:>7}  {'-' if best is None else f'{best:.4f}'}"
            for name, state, epochs, best in rows]
    return "\n".join([head, *body])
