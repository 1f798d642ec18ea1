"""`hvdtrain bench SPEC --input`: the input pipeline, measured by real training
runs (`hvdtrain run`, gloo ranks on this machine).

Throughput: the spec's model trained on the same samples (its synthetic
[C, H, W] images, quantised to 8 bits) held in memory, read from a folder of
PNG files and read from a memory-mapped .npy file, in alternating rounds;
samples/s per epoch (validation included), the first epoch (loader start-up)
left out. Memory: each rank's peak resident memory training an MLP on
memory-mapped .npy files of the sizes asked for, read by the rank itself
(data.workers 0). Start-up (--startup-files N): seconds from launch to the first
batch (metrics.jsonl's startup_s, the slowest rank's) on a folder of N small JPEG
files, the first time (the index built) and again (the index reused), with each
rank's peak resident memory.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import env
from .host import machine, versions

SOURCES = ("memory", "image_folder", "npy")


def write_sources(spec, scratch: Path) -> dict[str, list[str]]:
    """The spec's synthetic samples as 8-bit pixels, written three ways; the
    overrides that point a run at each."""
    from PIL import Image

    from ..data import synthetic
    shape = tuple(spec.data.synthetic.shape)
    x, y, _ = synthetic(spec.data)
    low, high = np.percentile(x, [0.5, 99.5])
    pixels = np.clip((x - low) / (high - low) * 255, 0, 255).astype(np.uint8).reshape(len(x), *shape)
    folder = scratch / "images"
    for i, (image, label) in enumerate(zip(pixels, y)):
        (folder / f"class-{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0).squeeze()).convert("RGB").save(folder / f"class-{label}" / f"{i:06d}.png")
    as_float = pixels.astype(np.float32) / 255.0
    np.savez(scratch / "memory.npz", x=as_float, y=y)
    (scratch / "npy").mkdir()
    np.save(scratch / "npy" / "x.npy", as_float)
    np.save(scratch / "npy" / "y.npy", y)
    size = f"data.image_size=[{shape[1]},{shape[2]}]"
    return {"memory": ["data.source=file", f"data.path={scratch / 'memory.npz'}", f"data.image_shape={list(shape)}"],
            # no augmentation: the same work as the other sources, the reading alone compared
            "image_folder": ["data.source=image_folder", f"data.path={folder}", size, "data.augment=none"],
            "npy": ["data.source=file", f"data.path={scratch / 'npy' / 'x.npy'}"]}


def train(spec_path: Path, ranks: int, out: Path, overrides: list[str], what: str,
          extra_env: dict[str, str] | None = None) -> list[dict]:
    """One `hvdtrain run`; its metrics.jsonl records."""
    cmd = [sys.executable, "-m", "hvdtrain", "run", str(spec_path), "-np", str(ranks), f"output={out}",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, timeout=3600)
    if proc.returncode != 0:
        raise UserError(f"input benchmark run {what} failed (exit {proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr)[-2500:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_npy(directory: Path, gib: float, features: int, seed: int = 0) -> int:
    """x.npy of about gib GiB of float32 blobs (written in chunks) and y.npy; the sample count."""
    n = int(gib * 2**30 / (4 * features))
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    y = rng.integers(0, 10, size=n)
    centres = rng.normal(size=(10, features)).astype(np.float32)
    x = np.lib.format.open_memmap(directory / "x.npy", mode="w+", dtype=np.float32, shape=(n, features))
    for start in range(0, n, 8192):
        part = y[start:start + 8192]
        x[start:start + len(part)] = centres[part] + rng.normal(scale=2.0, size=(len(part), features)).astype(np.float32)
    x.flush()
    del x
    np.save(directory / "y.npy", y)
    return n


def write_small_jpegs(folder: Path, count: int, classes: int = 100, side: int = 64) -> None:
    """count JPEG files of side x side pixels (quality 90) in `classes` class folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class-{c:03d}").mkdir(parents=True, exist_ok=True)
        base = np.kron(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.ones((side // 8, side // 8, 1), np.uint8))
        for i in range(c, count, classes):
            noise = rng.integers(0, 30, (side, side, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(folder / f"class-{c:03d}" / f"{i:07d}.jpg", quality=90)


def bench_startup(spec_path: Path, scratch: Path, ranks: int, files: int, log=print) -> dict[str, Any]:
    """Launch to first batch on `files` small JPEG files: the index built, then reused."""
    folder = scratch / "small-jpegs"
    began = time.perf_counter()
    write_small_jpegs(folder, files)
    log(f"wrote {files:,} JPEG files of 64 x 64 in {time.perf_counter() - began:.0f} s")
    overrides = ["data.source=image_folder", f"data.path={folder}", "data.image_size=16", "train.epochs=1",
                 "model={kind: cnn, channels: [8], hidden: [16]}",
                 "train.batch_size=2048", "checkpoint.every_epochs=100000"]
    result: dict[str, Any] = {"files": files, "image_side": 64, "ranks": ranks}
    cache = scratch / "cache"  # a cache of its own: the first run builds the index
    for attempt in ("first", "cached"):
        records = train(spec_path, ranks, scratch / f"startup-{attempt}", overrides, f"start-up ({attempt})",
                        extra_env={"HVDTRAIN_CACHE": str(cache)})
        result[f"{attempt}_startup_s"] = records[0]["startup_s"]
        result[f"{attempt}_peak_rss_mb_per_rank"] = records[0]["peak_rss_mb"]
        log(f"  start-up, {attempt} run: {records[0]['startup_s']:.1f} s to the first batch, peak RSS per "
            f"rank {records[0]['peak_rss_mb']:.0f} MB")
    return result


def bench_input(spec_path: Path, output: Path, ranks: int, rounds: int, epochs: int, sizes_gib: list[float],
                log=print, startup_files: int = 0) -> dict[str, Any]:
    from ..spec import load_spec
    spec = load_spec(spec_path)
    if spec.entry is not None or spec.data.source != "synthetic" or len(spec.data.synthetic.shape) != 3:
        raise UserError("hvdtrain bench --input writes the spec's synthetic images to disk: give it a spec "
                        "with data.source synthetic and data.synthetic.shape [C, H, W] "
                        "(examples/synthetic-cnn-torch.yaml)")
    if epochs < 2 or rounds < 1 or ranks < 1:
        raise UserError("--input needs --epochs of at least 2 (the first is left out), --rounds and ranks of 1 or more")
    workers = spec.data.workers if spec.data.workers else 2
    output.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    memory: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-input-") as scratch_name:
        scratch = Path(scratch_name)
        log(f"writing {spec.data.synthetic.samples} samples of shape {spec.data.synthetic.shape} three ways")
        sources = write_sources(spec, scratch)
        common = [f"train.epochs={epochs}", f"data.workers={workers}", "checkpoint.every_epochs=100000"]
        for round_ in range(rounds):
            for source in SOURCES:  # alternate, so that drift of the machine hits each alike
                overrides = sources[source] + common + (["data.workers=0"] if source == "memory" else [])
                records = train(spec_path, ranks, scratch / f"{source}-{round_}", overrides, f"{source} {round_ + 1}")
                rate = statistics.median(r["samples_per_s"] for r in records[1:])
                runs.append({"source": source, "round": round_, "samples_per_s": rate,
                             "peak_rss_mb": records[-1].get("peak_rss_mb")})
                log(f"  {source:12s} round {round_ + 1}: {rate:9.1f} samples/s")
        features = int(np.prod(spec.data.synthetic.shape))
        for gib in sizes_gib:
            directory = scratch / f"large-{gib}"
            n = write_npy(directory, gib, features)
            records = train(spec_path, ranks, scratch / f"large-run-{gib}",
                            ["data.source=file", f"data.path={directory / 'x.npy'}", "data.workers=0",
                             "model={kind: mlp, hidden: [32]}", "train.epochs=1", "train.batch_size=256",
                             "checkpoint.every_epochs=100000"], f"memory-mapped {gib} GiB")
            rss = records[-1]["peak_rss_mb"]
            memory.append({"data_gib": gib, "samples": n, "peak_rss_mb": rss,
                           "data_over_rss": gib * 1024 / rss, "samples_per_s": records[-1]["samples_per_s"]})
            log(f"  .npy of {gib:g} GiB ({n:,} samples): peak RSS per rank {rss:.0f} MB "
                f"(the data is {gib * 1024 / rss:.1f}x that)")
            for path in directory.iterdir():
                path.unlink()
        startup = bench_startup(spec_path, scratch, ranks, startup_files, log) if startup_files else None
    medians = {s: statistics.median(r["samples_per_s"] for r in runs if r["source"] == s) for s in SOURCES}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "versions": versions(),
              "settings": {"spec": str(spec_path), "ranks": ranks, "rounds": rounds, "epochs": epochs,
                           "data_workers": workers, "prefetch": spec.data.prefetch,
                           "samples": spec.data.synthetic.samples, "shape": spec.data.synthetic.shape,
                           "batch_size_per_rank": spec.train.batch_size},
              "throughput": runs, "median_samples_per_s": medians,
              "figures": {"image_folder_vs_memory": medians["image_folder"] / medians["memory"],
                          "npy_vs_memory": medians["npy"] / medians["memory"]},
              "memory": memory, "startup": startup}
    (output / "input.json").write_text(json.dumps(report, indent=2))
    plot(report, output / "input.png")
    log("\n" + "\n".join(f"{s:12s} {medians[s]:9.1f} samples/s  ({medians[s] / medians['memory']:.2f}x in-memory)"
                         for s in SOURCES))
    log(f"\nreport: {output / 'input.json'}, plot: {output / 'input.png'}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 2 if report["memory"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    for i, source in enumerate(SOURCES):
        rates = [r["samples_per_s"] for r in report["throughput"] if r["source"] == source]
        ax.bar(i, statistics.median(rates), color="tab:blue")
        ax.plot([i] * len(rates), rates, "k.", markersize=4)
    ax.set_xticks(range(len(SOURCES)), ["in memory", "image folder", "memory-mapped"])
    ax.set_ylabel("samples/s (median epoch)")
    ax.set_title(f"{report['settings']['ranks']} ranks, data.workers {report['settings']['data_workers']}")
    if report["memory"]:
        ax = axes[0][1]
        sizes = [m["data_gib"] * 1024 for m in report["memory"]]
        ax.plot(sizes, [m["peak_rss_mb"] for m in report["memory"]], "o-", label="peak RSS per rank")
        ax.plot(sizes, sizes, "--", color="grey", label="data set size")
        ax.set_xlabel("memory-mapped .npy (MB)")
        ax.set_ylabel("MB")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
