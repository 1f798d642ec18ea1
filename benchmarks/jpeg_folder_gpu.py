#!/usr/bin/env python3
"""ResNet-50 on one GPU from a folder of JPEG files against the same model on data
kept on the GPU, side by side in one run: epoch throughput (samples/s, validation
included, from metrics.jsonl; the first epoch left out) and the seconds from the
run's final line to its exit.

    benchmarks/jpeg_folder_gpu.py OUT_DIR [--images 20000] [--size 256] [--workers 14]

The folder: --images JPEG files (quality 90, --size px square, 100 classes) of
smooth random colour fields, written in parallel. The runs: benchmarks/resnet50-gpu.yaml
in bf16, (a) its synthetic samples kept on the GPU, (b) the folder with
data.augment standard at 224 px (random resized crops and flips, uint8 to the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "benchmarks" / "resnet50-gpu.yaml"
COMMON = ["train.precision=bf16", "train.epochs=3", "train.batch_size=256", "data.validation_fraction=0.1"]


def write_images(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image
    folder, first, count, size = args
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        target = folder / f"class-{i % 100:03d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90)


def run(out: Path, overrides: list[str]) -> dict:
    """One `hvdtrain run` on 1 GPU: epoch throughput and the seconds from its final line
    (rank 0's 'final ...') to its exit."""
    cmd = [sys.executable, "-m", "hvdtrain", "run", str(SPEC), "-np", "1", f"output={out}", *COMMON, *overrides]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    final_at, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if final_at is None and "final validation" in line:
            final_at = time.monotonic()
    proc.wait()
    ended = time.monotonic()
    (out.parent / f"{out.name}.log").write_text("".join(lines))
    if proc.returncode != 0:
        return {"exit": proc.returncode, "log_tail": "".join(lines)[-3000:]}
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return {"exit": 0, "samples_per_s": [round(r["samples_per_s"], 1) for r in records],
            "launch_to_exit_s": round(ended - began, 1),
            "final_line_to_exit_s": round(ended - final_at, 1) if final_at else None,
            "overrides": overrides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args()
    out = Path(args.out)
    folder = out / "jpegs"
    began = time.monotonic()
    chunks = [(folder, first, min(500, args.images - first), args.size) for first in range(0, args.images, 500)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_images, chunks))
    written = time.monotonic() - began
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"1 x {gpu}, {os.cpu_count()} CPU cores",
              "spec": str(SPEC.relative_to(ROOT)), "common": COMMON,
              "folder": {"images": args.images, "size": args.size, "quality": 90, "classes": 100,
                         "written_s": round(written, 1)}}
    report["on_gpu"] = run(out / "on-gpu", ["data.synthetic.samples=10240", "data.on_device=true"])
    report["jpeg_folder"] = run(out / "jpeg-folder", [
        "data.source=image_folder", f"data.path={folder}", "data.image_size=224", "data.augment=standard",
        f"data.workers={args.workers}", "data.prefetch=4", "data.synthetic=null"])
    a, b = report["on_gpu"].get("samples_per_s"), report["jpeg_folder"].get("samples_per_s")
    if a and b:
        report["jpeg_folder_vs_on_gpu"] = round(np.median(b[1:]) / np.median(a[1:]), 3)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
