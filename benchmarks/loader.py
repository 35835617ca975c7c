"""Images per second of samkit's streaming loader (samkit.data.StreamingLoader) by worker count.

Writes a generated file-list set (JPEG photos-like images of side --size, a list file of
`relative/path label` lines) into a temporary folder, then times full passes of the training
pipeline (decode, random resized crop to --crop, flip, collate, float conversion, normalisation)
with each number of DataLoader worker processes. The first batch of each pass is excluded from the
timing (worker start-up); the pass is otherwise timed whole.

    python benchmarks/loader.py                       # 2000 JPEGs at 256 px, crops of 224, 0/2/4 workers
    python benchmarks/loader.py --workers 0 8 --images 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samkit.data import StreamingDataset, StreamingLoader, load_file_list


def write_set(root: Path, images: int, size: int, classes: int = 10) -> Path:
    """`images` smooth random RGB JPEGs (quality 90) of size x size under root/img/<class>/, and
    root/train.txt listing them; returns the list file."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(images):
        label = i % classes
        coarse = rng.uniform(0, 255, size=(size // 16, size // 16, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        rel = f"img/{label}/{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, quality=90)
        lines.append(f"{rel} {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def images_per_second(files, crop: int, batch: int, workers: int) -> float:
    loader = StreamingLoader(StreamingDataset(files, crop, train=True), batch, seed=0,
                             workers=workers)
    seen, start = 0, None
    for x, _ in loader:
        if start is None:  # the first batch pays for the workers' start
            start = time.perf_counter()
            continue
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = load_file_list(write_set(Path(tmp), args.images, args.size), tmp)
        rows = []
        for workers in args.workers:
            rate = images_per_second(files, args.crop, args.batch, workers)
            rows.append({"workers": workers, "images_per_second": round(rate, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"images": args.images, "size": args.size, "crop": args.crop,
                      "batch": args.batch, "cpus": os.cpu_count(),
                      "processor": platform.processor() or platform.machine(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
