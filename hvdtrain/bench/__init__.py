"""`hvdtrain bench`: training throughput of hvdtrain against a hand-written
Horovod loop, PyTorch DDP and hvdtrain's TensorFlow backend on the same spec,
and an allreduce micro-benchmark, measured side by side in one run.

Launches alternate (A, B, C, A, B, C, ...) so that drift of the machine hits
every implementation alike; each launch warms up, then times whole windows of
steps between barriers on rank 0. Every process runs one thread.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..train.startup import describe
from .host import gpu_names, machine, versions

TRAIN_IMPLS = ("hvdtrain", "horovod", "ddp", "tensorflow", "local")
DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
TARGETS = {"hvdtrain_vs_horovod": 0.97, "horovod_vs_ddp": 1.0, "hvdtrain_vs_ddp": 1.0, "scaling_efficiency": 0.9,
           "allreduce_vs_torch": 0.9}


# -- arithmetic of the report (unit tested) ------------------------------------------

def summarize(samples_per_s: list[float]) -> dict[str, float]:
    """Median and spread of per-window throughputs."""
    if not samples_per_s or any(v <= 0 for v in samples_per_s):
        raise ValueError("throughputs must be positive and present")
    ordered = sorted(samples_per_s)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "spread": (ordered[-1] - ordered[0]) / statistics.median(ordered), "windows": len(ordered)}


def ratio(a: float, b: float) -> float:
    return a / b


def scaling_efficiency(one_rank: float, n_ranks: float, n: int) -> float:
    """throughput(n) / (n x throughput(1))."""
    return n_ranks / (n * one_rank)


def bandwidths(nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algorithm bandwidth, bus bandwidth) in bytes/s; a ring allreduce moves
    2 (n - 1) / n of the buffer per rank (NCCL-tests' convention)."""
    algbw = nbytes / seconds
    return algbw, algbw * (2 * (ranks - 1) / ranks if ranks > 1 else 1.0)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except (ValueError, IndexError):
        raise UserError(f"message size {text!r}: use e.g. 4K, 1M, 256M") from None


# -- launching ------------------------------------------------------------------------

@dataclass
class Settings:
    spec: Path
    ranks: list[int]
    rounds: int
    windows: int
    steps: int
    warmup: int
    impls: list[str]
    sizes: list[int]
    output: Path
    overrides: list[str] = field(default_factory=list)  # key.path=value, for every launch
    profile: bool = False  # torch.profiler over each torch launch's last window (output/profile/)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def launcher(impl: str, ranks: int, controller: str = "gloo") -> list[str]:
    from ..launch.local import horovodrun_path
    if impl in ("ddp", "local", "torch"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                "-m", "hvdtrain.bench.worker"]
    return [horovodrun_path(), "-np", str(ranks), "-H", f"localhost:{ranks}", f"--{controller}",
            sys.executable, "-m", "hvdtrain.bench.worker"]


def launch(cmd: list[str], out: Path, what: str) -> dict:
    # the ranks time their start-up from here (train.startup)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**env(), "HVDTRAIN_LAUNCHED_AT": str(time.time())})
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-2500:]
        raise UserError(f"benchmark run {what} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def attempt(cmd: list[str], out: Path, what: str, failures: list[dict], log) -> dict | None:
    """One launch; a failed one is logged and recorded, and the benchmark goes on."""
    try:
        return launch(cmd, out, what)
    except (UserError, subprocess.TimeoutExpired) as error:
        failures.append({"run": what, "error": str(error)})
        log(f"  {what}: FAILED (recorded in the report)")
        return None


HAND_WRITTEN = ("horovod", "ddp", "local")


def placements(impl: str, gpu: bool) -> list[str]:
    """On a GPU the hand-written loops run twice: fed per batch from pinned host memory
    (as a DataLoader feeds a loop, like hvdtrain) and with every batch resident on the GPU."""
    return ["host", "resident"] if gpu and impl in HAND_WRITTEN else ["host"]


def label(impl: str, placement: str) -> str:
    return impl if placement == "host" else f"{impl}-gpu-resident"


def run_training(s: Settings, scratch: Path, log, failures: list[dict], gpu: bool = False) -> list[dict]:
    runs = []
    for round_ in range(s.rounds):
        for ranks in s.ranks:  # alternate rank counts and implementations: A1 B1 A2 B2, A1 B1 ...
            for impl in s.impls:
                for placement in placements(impl, gpu):
                    name = label(impl, placement)
                    out = scratch / f"train-{name}-{ranks}-{round_}.json"
                    cmd = [*launcher(impl, ranks), "train", impl, str(s.spec), str(out), "--windows",
                           str(s.windows), "--steps", str(s.steps), "--warmup", str(s.warmup),
                           "--placement", placement, *(f"--set={o}" for o in s.overrides)]
                    if s.profile and impl != "tensorflow":
                        cmd += ["--profile", str(s.output / "profile" / f"{name}-{ranks}-{round_ + 1}")]
                    result = attempt(cmd, out, f"{name} on {ranks} rank(s), round {round_ + 1}", failures, log)
                    if result is None:
                        continue
                    rates = [n / t for n, t in zip(result["window_samples"], result["window_seconds"])]
                    runs.append({"impl": impl, "placement": placement, "ranks": ranks, "round": round_,
                                 "samples_per_s": rates, "window_samples": result["window_samples"],
                                 "window_optimizer_steps": result["window_optimizer_steps"],
                                 "window_allreduces": result["window_allreduces"],
                                 "startup_phases": result["startup_phases"],
                                 "graphs_compiled_in_warmup": result.get("graphs_compiled_in_warmup"),
                                 "graphs_compiled_after_warmup": result.get("graphs_compiled_after_warmup"),
                                 "after_last_gradient_ms": result.get("after_last_gradient_ms")})
                    recompiled = result.get("graphs_compiled_after_warmup")
                    log(f"  {name:22s} {ranks} rank(s), round {round_ + 1}: "
                        f"{statistics.median(rates):9.1f} samples/s; to the first timed window "
                        f"{describe(result['startup_phases'])}"
                        + (f"; {recompiled} graph(s) compiled after warm-up" if recompiled else "")
                        + (f"; {tail:.1f} ms a step after its last gradient" if (tail := result.get(
                            "after_last_gradient_ms")) is not None else ""))
    return runs


def unequal_work(runs: list[dict]) -> list[str]:
    """Every implementation must process the same samples and take the same optimizer
    steps in each window, as its workers counted them."""
    problems = []
    for ranks in sorted({r["ranks"] for r in runs}):
        seen = {(label(r["impl"], r["placement"]), r["round"]): (r["window_samples"], r["window_optimizer_steps"])
                for r in runs if r["ranks"] == ranks}
        distinct = set(map(repr, seen.values()))
        if len(distinct) > 1:
            problems.append(f"{ranks} rank(s): samples and optimizer steps per window differ: "
                            + "; ".join(f"{name} round {rnd + 1}: samples {w[0]}, steps {w[1]}"
                                        for (name, rnd), w in seen.items()))
    return problems


def refused_settings(spec, impls: list[str], steps: int, warmup: int) -> list[str]:
    """Spec settings that change the work and that an implementation cannot follow."""
    hand = [i for i in impls if i in HAND_WRITTEN]
    problems = []
    if spec.horovod.adasum and "ddp" in impls:
        problems.append("horovod.adasum: DDP has no Adasum reduction (bench it with --impls hvdtrain,horovod)")
    if hand and spec.train.precision == "fp16":
        problems.append(f"train.precision fp16: the hand-written loops ({', '.join(hand)}) run fp32 or bf16")
    if hand and spec.train.grad_clip_norm:
        problems.append(f"train.grad_clip_norm: the hand-written loops ({', '.join(hand)}) do not clip")
    passes = spec.horovod.backward_passes_per_step
    if steps % passes or warmup % passes:
        problems.append(f"horovod.backward_passes_per_step {passes}: --steps ({steps}) and --warmup ({warmup}) "
                        "must be multiples of it, so that every window holds whole groups")
    return problems


def run_allreduce(s: Settings, scratch: Path, mpi: bool, gpu: bool, log, failures: list[dict]) -> list[dict]:
    if not s.sizes or max(s.ranks) < 2:
        return []
    ranks = max(s.ranks)
    sizes = ",".join(map(str, s.sizes))
    if gpu:  # GPU tensors: Horovod's NCCL ops against torch.distributed's NCCL backend
        variants = [("horovod-nccl", "horovod", "gloo"), ("torch-nccl", "torch", "gloo")]
    else:
        variants = [("horovod-gloo", "horovod", "gloo"), ("torch-gloo", "torch", "gloo")]
        if mpi:
            variants.insert(1, ("horovod-mpi", "horovod", "mpi"))
    rows = []
    for name, impl, controller in variants:
        out = scratch / f"allreduce-{name}.json"
        cmd = [*launcher(impl, ranks, controller), "allreduce", impl, str(out), "--sizes", sizes,
               *(["--gpu"] if gpu else [])]
        if controller == "mpi":  # horovodrun --mpi runs mpirun, which needs this as root
            cmd[1:1] = ["--mpi-args=--allow-run-as-root"] if os.geteuid() == 0 else []
        result = attempt(cmd, out, f"allreduce {name}", failures, log)
        if result is None:
            continue
        for row in result["allreduce"]:
            algbw, busbw = bandwidths(row["bytes"], row["seconds"], ranks)
            rows.append({"impl": name, "ranks": ranks, "bytes": row["bytes"], "seconds": row["seconds"],
                         "algbw": algbw, "busbw": busbw})
        log(f"  allreduce {name}: done")
    rows += memcpy_rows(s.sizes)
    return rows


def memcpy_rows(sizes: list[int]) -> list[dict]:
    """One process copying the same bytes: the loopback limit on one host."""
    import numpy as np
    rows = []
    for nbytes in sizes:
        src, dst = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
        times = []
        for _ in range(max(5, min(100, (256 << 20) // nbytes))):
            began = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - began)
        seconds = statistics.median(times)
        rows.append({"impl": "memcpy", "ranks": 1, "bytes": nbytes, "seconds": seconds,
                     "algbw": nbytes / seconds, "busbw": nbytes / seconds})
    return rows


# -- the report -----------------------------------------------------------------------

def throughput_table(runs: list[dict]) -> list[dict]:
    table = []
    for impl, placement in dict.fromkeys((r["impl"], r["placement"]) for r in runs):
        for ranks in sorted({r["ranks"] for r in runs}):
            chosen = [r for r in runs if (r["impl"], r["placement"], r["ranks"]) == (impl, placement, ranks)]
            rates = [v for r in chosen for v in r["samples_per_s"]]
            if rates:
                allreduces = [a for r in chosen for a in r["window_allreduces"] if a is not None]
                starts = [sum(r["startup_phases"].values()) for r in chosen if r.get("startup_phases")]
                compiles = [r["graphs_compiled_after_warmup"] for r in chosen
                            if r.get("graphs_compiled_after_warmup") is not None]
                tails = [r["after_last_gradient_ms"] for r in chosen if r.get("after_last_gradient_ms") is not None]
                table.append({"impl": label(impl, placement), "placement": placement, "ranks": ranks,
                              "communicated": bool(sum(allreduces)) if allreduces else None,
                              **summarize(rates), "startup_s": statistics.median(starts) if starts else None,
                              "graphs_compiled_after_warmup": max(compiles) if compiles else None,
                              # the wait for the gradients' allreduces and the update, a step (CPU)
                              "after_last_gradient_ms": statistics.median(tails) if tails else None})
    return table


SINGLE_RANK = "single rank: no communication measured"
# the ratios between implementations at 2 or more ranks: (name, numerator, denominator)
PAIRS = (("hvdtrain_vs_horovod", "hvdtrain", "horovod"), ("horovod_vs_ddp", "horovod", "ddp"),
         ("hvdtrain_vs_ddp", "hvdtrain", "ddp"), ("tensorflow_vs_hvdtrain", "tensorflow", "hvdtrain"),
         ("hvdtrain_vs_horovod_gpu_resident", "hvdtrain", "horovod-gpu-resident"),
         ("horovod_vs_ddp_gpu_resident", "horovod-gpu-resident", "ddp-gpu-resident"))


def figures(table: list[dict], allreduce: list[dict]) -> dict[str, Any]:
    """Ratios between implementations at the largest rank count, only where it is >= 2:
    at one rank Horovod allreduces nothing while DDP still runs its reducer."""
    med = {(t["impl"], t["ranks"]): t["median"] for t in table}
    top = max((r for _, r in med), default=0)
    out: dict[str, Any] = {}
    if top < 2:
        out["note"] = SINGLE_RANK
        # hvdtrain and the hand-written Horovod loop do the same work at one rank (neither
        # allreduces): their ratio compares step loops and input paths, not communication
        loops = {name: ratio(med[a, 1], med[b, 1]) for name, a, b in (
            ("hvdtrain_vs_horovod", "hvdtrain", "horovod"),
            ("hvdtrain_vs_horovod_gpu_resident", "hvdtrain", "horovod-gpu-resident"),
            ("hvdtrain_vs_plain_pytorch", "hvdtrain", "local"),
            ("hvdtrain_vs_plain_pytorch_gpu_resident", "hvdtrain", "local-gpu-resident"))
            if (a, 1) in med and (b, 1) in med}
        if loops:
            out["single_rank_step_loops"] = loops
    else:
        # horovod_vs_ddp: Horovod as users write it (this build); hvdtrain_vs_ddp: as hvdtrain runs
        # it (gradients in buckets, horovod.bucket_mb)
        for name, a, b in PAIRS:
            if (a, top) in med and (b, top) in med:
                out[name] = ratio(med[a, top], med[b, top])
        out["scaling_efficiency"] = {impl: scaling_efficiency(med[impl, 1], med[impl, top], top)
                                     for impl, r in med if r == 1 and (impl, top) in med}
        # what the 1-rank baselines did: Horovod registers no gradient hooks at size 1
        out["one_rank_baseline_communicated"] = {t["impl"]: t["communicated"] for t in table
                                                 if t["ranks"] == 1 and t["communicated"] is not None}
    big = [r for r in allreduce if r["bytes"] >= 1 << 20]
    by = {(r["impl"], r["bytes"]): r["busbw"] for r in big}
    ratios = [by[i, b] / by[i.replace("horovod", "torch"), b] for (i, b) in by
              if i in ("horovod-gloo", "horovod-nccl") and (i.replace("horovod", "torch"), b) in by]
    if ratios:
        out["allreduce_vs_torch"] = {"min": min(ratios), "median": statistics.median(ratios)}
    return out


def paired_by_round(runs: list[dict]) -> dict[str, dict]:
    """The ratios of PAIRS at the largest rank count round by round (each one's median in a
    round over the other's in the same round), and their median: alternating rounds meet a
    machine's drift alike, so where it drifts this is the steadier figure."""
    top = max((r["ranks"] for r in runs), default=0)
    by = {(label(r["impl"], r["placement"]), r["round"]): statistics.median(r["samples_per_s"])
          for r in runs if r["ranks"] == top >= 2}
    out = {}
    for name, a, b in PAIRS:
        ratios = [ratio(by[a, k], by[b, k]) for k in sorted({k for _, k in by}) if (a, k) in by and (b, k) in by]
        if len(ratios) >= 2:
            out[name] = {"median": statistics.median(ratios), "rounds": ratios}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    table = report["throughput"]
    labels = [f"{t['impl']}\n{t['ranks']} rank{'s' if t['ranks'] > 1 else ''}" for t in table]
    medians = [t["median"] for t in table]
    errors = [[t["median"] - t["min"] for t in table], [t["max"] - t["median"] for t in table]]
    bars.bar(range(len(table)), medians, yerr=errors, capsize=4,
             color=[f"C{sorted({t['impl'] for t in table}).index(t['impl'])}" for t in table])
    bars.set_xticks(range(len(table)), labels, fontsize=8)
    bars.set_ylabel("samples/s (median, min-max over windows)")
    bars.set_title(f"training throughput: {report['settings']['spec_name']}")
    for impl in dict.fromkeys(r["impl"] for r in report["allreduce"]):
        rows = [r for r in report["allreduce"] if r["impl"] == impl]
        lines.plot([r["bytes"] for r in rows], [r["busbw"] / 1e9 for r in rows], marker="o", label=impl)
    lines.set_xscale("log", base=2)
    lines.set_yscale("log")
    lines.set_xlabel("message size (bytes)")
    lines.set_ylabel("bus bandwidth (GB/s); memcpy: copy rate")
    lines.set_title(f"allreduce, {max(report['settings']['ranks'])} ranks on one host")
    if report["allreduce"]:
        lines.legend()
    fig.suptitle(f"{report['machine']['cpu']} ({report['machine']['cores']} cores), {report['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict, log) -> None:
    log(f"\n{'implementation':14s} {'ranks':>5s} {'median':>10s} {'min':>10s} {'max':>10s}  samples/s"
        f"  {'start-up':>8s} (to the first timed window)")
    for t in report["throughput"]:
        log(f"{t['impl']:14s} {t['ranks']:5d} {t['median']:10.1f} {t['min']:10.1f} {t['max']:10.1f}"
            + (f"             {t['startup_s']:6.1f} s" if t.get("startup_s") is not None else ""))
    for name, value in report["figures"].items():
        if isinstance(value, str):
            shown = value
        elif isinstance(value, dict):
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        else:
            shown = f"{value:.3f}"
        target = f" (target >= {TARGETS[name]})" if name in TARGETS else ""
        log(f"{name}: {shown}{target}")
    for name, paired in report.get("paired_by_round", {}).items():
        log(f"{name}, round by round: median {paired['median']:.3f} of "
            + ", ".join(f"{v:.3f}" for v in paired["rounds"]))


def bench(s: Settings, log=print) -> dict:
    from ..horovod_build.build import mpi_version
    from ..spec import load_spec
    spec = load_spec(s.spec, s.overrides)
    if spec.entry is not None or spec.task == "regression" or spec.loss != "cross_entropy":
        raise UserError("hvdtrain bench compares hand-written loops that train a classifier (or a language "
                        "model) with cross-entropy: give it a spec without entry, with task classification "
                        "or language_modeling and loss cross_entropy")
    unknown = set(s.impls) - set(TRAIN_IMPLS)
    if unknown:
        raise UserError(f"unknown implementation(s) {sorted(unknown)}: choose from {', '.join(TRAIN_IMPLS)}")
    if min(s.ranks) < 1 or min(s.windows, s.steps, s.rounds) < 1 or s.warmup < 0:
        raise UserError("--ranks, --rounds, --windows and --steps must be at least 1")
    refused = refused_settings(spec, s.impls, s.steps, s.warmup)
    if refused:
        raise UserError("hvdtrain bench compares equal work; this spec's settings cannot be followed:\n  "
                        + "\n  ".join(refused))
    gpu = spec.resources.gpus_per_worker > 0
    if gpu and not gpu_names():
        raise UserError("the spec asks for GPUs (resources.gpus_per_worker) but torch sees no CUDA device "
                        "here: nothing would run on a GPU; bench a spec with gpus_per_worker 0")
    s.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-") as scratch:
        log(f"training throughput, {s.rounds} round(s) x {s.windows} window(s) x {s.steps} steps:")
        failures: list[dict] = []
        runs = run_training(s, Path(scratch), log, failures, gpu=gpu)
        failures += [{"run": "equal work", "error": problem} for problem in unequal_work(runs)]
        log("allreduce:")
        allreduce = run_allreduce(s, Path(scratch), mpi=mpi_version() is not None, gpu=gpu, log=log,
                                  failures=failures)
    if not runs and not allreduce:
        raise UserError("every benchmark run failed; the first error:\n" + failures[0]["error"])
    table = throughput_table(runs)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "versions": versions(),
              "settings": {"spec": str(s.spec), "overrides": s.overrides, "spec_name": spec.name, "ranks": s.ranks, "rounds": s.rounds,
                           "windows_per_round": s.windows, "steps_per_window": s.steps,
                           "warmup_steps": s.warmup, "batch_size_per_rank": spec.train.batch_size,
                           "threads_per_rank": 1, "impls": s.impls,
                           "optimizer": spec.optimizer.model_dump(mode="json"),
                           "precision": spec.train.precision, "compile": spec.train.compile,
                           "channels_last": spec.train.channels_last,
                           "horovod": spec.horovod.model_dump(mode="json")},
              "gpus": gpu_names() if gpu else [],
              "runs": runs, "throughput": table, "allreduce": allreduce,
              "figures": figures(table, allreduce), "paired_by_round": paired_by_round(runs),
              "targets": TARGETS, "failures": failures}
    (s.output / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, s.output / "bench.png")
    print_table(report, log)
    log(f"\nreport: {s.output / 'bench.json'}, plot: {s.output / 'bench.png'}")
    if failures:
        raise UserError(f"{len(failures)} benchmark run(s) failed ({', '.join(f['run'] for f in failures)}); "
                        f"the report holds every figure measured. The first error:\n{failures[0]['error']}")
    return report
