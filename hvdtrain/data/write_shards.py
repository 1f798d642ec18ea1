"""`hvdtrain shards DIR OUT`: an image folder written as WebDataset tar shards, the
files' bytes as they are (nothing decoded or re-encoded), in a seeded random order
so that each shard holds a mix of the classes.

DIR is read as `data.source: image_folder` reads it (its checked index): train/
and val/ folders become train-NNNNNN.tar and val-NNNNNN.tar shards, one folder of
classes becomes train-NNNNNN.tar alone (the validation split is then drawn from
the samples); classes.txt names the classes, line k for class k. Each sample is
`<key>.<jpg|jpeg|png>` and `<key>.cls`, WebDataset's layout, which its own
reader and `data.source: webdataset` both read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from . import folder_index
from .images import check_images, class_files


def write_shards(root: Path, out: Path, per_shard: int = 1000, seed: int = 0) -> dict[str, int]:
    """The shards of root's image folder in out; the sample count of each split."""
    try:
        import webdataset
    except ImportError:
        raise DataError("hvdtrain shards writes with the webdataset package: pip install "
                        "'hvdtrain[webdataset]'") from None
    if any(out.glob("*.tar")):
        raise DataError(f"{out}: holds .tar files already; give an empty or new directory")
    listing = folder_index.image_files(root, check_images)
    val = next((n for n in ("val", "validation") if (root / n).is_dir()), None)
    parts = {"train": "train", "val": val} if (root / "train").is_dir() and val else {"train": ""}
    files, classes = class_files(root, parts["train"], listing)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {}
    for part, folder in parts.items():
        in_part = files if part == "train" else class_files(root, folder, listing, classes)[0]
        samples = [(path, label) for label, name in enumerate(classes) for path in in_part[name]]
        order = rng.permutation(len(samples))
        for first in range(0, len(samples), per_shard):
            target = out / f"{part}-{first // per_shard:06d}.tar"
            written = target.with_suffix(".tar.partial")
            with webdataset.TarWriter(str(written), encoder=False, mtime=0) as tar:
                for i in order[first:first + per_shard]:
                    path, label = samples[i]
                    tar.write({"__key__": f"{i:09d}", path.suffix[1:].lower(): path.read_bytes(),
                               "cls": str(label).encode()})
            written.replace(target)
        counts[part] = len(samples)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    return counts
