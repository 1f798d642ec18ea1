#!/usr/bin/env python3
"""ResNet-50 on one GPU from a folder of JPEG files against the same model on data
kept on the GPU, side by side in one run, decoding on the CPU and on the GPU, from
WebDataset shards of the same files, and torchvision's ImageFolder loop written by
hand: throughput of the training steps (train_samples_per_s from metrics.jsonl, the
first epoch left out; the epoch's with its validation beside it) and the seconds
from the run's final line to its exit. Ratios: each run's training throughput
over that of the data kept on the GPU (`_vs_on_gpu`) and of the hand-written loop
(`_vs_torchvision_loop`), equal work: the loop has no validation.

    benchmarks/jpeg_folder_gpu.py OUT_DIR [--images 20000] [--size 256] [--workers 14] [--only NAME,...]

--only runs the named measurements alone and adds them to OUT_DIR/report.json (the
folder is written once): a GPU lease's calls can split the runs.

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
            "train_samples_per_s": [round(r["train_samples_per_s"], 1) for r in records],
            "launch_to_exit_s": round(ended - began, 1),
            "startup_s": records[0].get("startup_s"), "startup_phases": records[0].get("startup_phases"),
            "final_line_to_exit_s": round(ended - final_at, 1) if final_at else None,
            "overrides": overrides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--only", default="", help="comma-separated measurement names (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    folder = out / "jpegs"
    began = time.monotonic()
    if not (folder / "class-099").is_dir():
        chunks = [(folder, first, min(500, args.images - first), args.size)
                  for first in range(0, args.images, 500)]
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(write_images, chunks))
    written = time.monotonic() - began
    earlier = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"1 x {gpu}, {os.cpu_count()} CPU cores",
              "spec": str(SPEC.relative_to(ROOT)), "common": COMMON,
              "folder": {"images": args.images, "size": args.size, "quality": 90, "classes": 100,
                         "written_s": earlier.get("folder", {}).get("written_s", round(written, 1))}}
    report.update({k: v for k, v in earlier.items() if k not in report})
    images = ["data.image_size=224", "data.augment=standard", f"data.workers={args.workers}", "data.prefetch=4",
              "data.synthetic=null"]
    shards = out / "shards"
    runs = {
        "on_gpu": lambda: run(out / "on-gpu", ["data.synthetic.samples=5120", "data.on_device=true"]),
        "jpeg_folder_decode_cpu": lambda: run(out / "jpeg-cpu", [
            "data.source=image_folder", f"data.path={folder}", "data.decode=cpu", *images]),
        "jpeg_folder_decode_gpu": lambda: run(out / "jpeg-gpu", [
            "data.source=image_folder", f"data.path={folder}", "data.decode=gpu", *images]),
        "torchvision_imagefolder_loop": lambda: plain_loop(folder, args.workers),
        "loaders_alone": lambda: loaders_alone(folder, args.workers),
        "webdataset_decode_gpu": lambda: write_shards(folder, shards) or run(out / "shards-gpu", [
            "data.source=webdataset", f"data.path={shards}", "data.decode=gpu", *images]),
    }
    chosen = [n for n in args.only.split(",") if n] or list(runs)
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (known: {', '.join(runs)})")
    for name in chosen:
        measure = runs[name]
        report[name] = measure()
        add_ratios(report, list(runs))
        (out / "report.json").write_text(json.dumps(report, indent=2))  # each run's figures as soon as known
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))
    return 0


def add_ratios(report: dict, names: list[str]) -> None:
    """Each run's training throughput (median of epochs 2..) over the data kept on the GPU's
    and over the hand-written loop's, where both are known."""
    def median(name: str) -> float | None:
        rates = report.get(name, {}).get("train_samples_per_s")
        return float(np.median(rates[1:])) if rates and len(rates) > 1 else None

    for name in names:
        for base in ("on_gpu", "torchvision_imagefolder_loop"):
            if name != base and median(name) and median(base):
                report[f"{name}_vs_{base}"] = round(median(name) / median(base), 3)


def loaders_alone(folder: Path, workers: int) -> dict:
    """The input pipelines alone, no model: batches of 256 on the GPU per second from
    hvdtrain's loader (each decode path, the spec's augmentation) and from torchvision's
    ImageFolder + DataLoader, two passes each over the training split (the second timed)."""
    code = f"""
import json, time, numpy as np, torch, torchvision
from torchvision.transforms import v2
from hvdtrain.spec import load_spec
from hvdtrain.data import load_dataset
from hvdtrain.backends.torch_input import make_loader
device, rates = torch.device("cuda", 0), {{}}
for decode in ("cpu", "gpu"):
    spec = load_spec({str(SPEC)!r}, ["data.source=image_folder", "data.path={folder}", "data.decode=" + decode,
        "data.image_size=224", "data.augment=standard", "data.workers={workers}", "data.prefetch=4",
        "data.synthetic=null"])
    train = load_dataset(spec.data, image=True).train
    order = np.random.default_rng(0).permutation(len(train))
    batches = [order[i:i + 256] for i in range(0, len(order) - 255, 256)]
    loader = make_loader(spec.data, device)
    for epoch in range(2):
        began = time.perf_counter()
        for x, y in loader(train, batches, epoch):
            x.float().sum()
        torch.cuda.synchronize()
        rates["hvdtrain_decode_" + decode] = round(len(batches) * 256 / (time.perf_counter() - began), 1)
    loader.close()
tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
data = torchvision.datasets.ImageFolder({str(folder)!r}, transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True, num_workers={workers}, pin_memory=True,
                                     persistent_workers=True, prefetch_factor=4, drop_last=True)
for epoch in range(2):
    began, seen = time.perf_counter(), 0
    for x, y in loader:
        x.cuda(non_blocking=True).float().sum()
        seen += len(y)
    torch.cuda.synchronize()
    rates["torchvision"] = round(seen / (time.perf_counter() - began), 1)
print(json.dumps(rates))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"exit": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    return {"exit": 0, "samples_per_s": json.loads(proc.stdout.strip().splitlines()[-1]), "workers": workers}


def write_shards(folder: Path, shards: Path) -> None:
    subprocess.run([sys.executable, "-m", "hvdtrain", "shards", str(folder), str(shards)], check=True)


def plain_loop(folder: Path, workers: int) -> dict:
    """torchvision's ImageFolder and DataLoader (RandomResizedCrop, flip, uint8 tensors
    to the GPU), ResNet-50 bf16 channels-last, SGD: the loop a user writes by hand.
    samples/s per epoch of training alone."""
    code = f"""
import json, time, torch, torchvision
from torchvision.transforms import v2
tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
data = torchvision.datasets.ImageFolder({str(folder)!r}, transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True, num_workers={workers}, pin_memory=True,
                                     persistent_workers=True, prefetch_factor=4, drop_last=True)
model = torchvision.models.resnet50(num_classes=100).cuda().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255
rates = []
for epoch in range(3):
    began, seen = time.perf_counter(), 0
    for x, y in loader:
        x = ((x.cuda(non_blocking=True).float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y.cuda(non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    torch.cuda.synchronize()
    rates.append(round(seen / (time.perf_counter() - began), 1))
print(json.dumps(rates))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"exit": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    return {"exit": 0, "train_samples_per_s": json.loads(proc.stdout.strip().splitlines()[-1]), "workers": workers}


if __name__ == "__main__":
    sys.exit(main())
