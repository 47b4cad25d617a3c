"""The kvcache demo: cache an expensive dataset, then read it back through a DataLoader.

The source imitates a real image dataset: every sample is a compressed "file" that is
read with a storage latency, decompressed, converted to float, resized and normalised.
Epoch 1 computes each sample once and stores it; epoch 2 reads every sample from the
cache. Random augmentation stays outside the cache (it must differ every epoch).

    bash tools/demo.sh                 # fresh machine: sets up .venv, then runs this
    .venv/bin/python tools/demo.py --n 8000 --workers 2 --cache /tmp/demo_cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kvcache import LmdbCachedDataset, open_cache


class SyntheticImages(Dataset):
    """``n`` compressed 64x64 RGB "files" decoded to normalised float32 3x32x32 tensors."""

    def __init__(self, n: int, latency_s: float = 0.001, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        self.files = []
        for i in range(n):  # each "file": a shifted, noisy copy of a base image, compressed
            img = np.roll(base, i % 64, axis=0) ^ rng.integers(0, 8, size=base.shape, dtype=np.uint8)
            self.files.append(zlib.compress(img.tobytes(), 6))
        self.labels = rng.integers(0, 10, size=n).tolist()
        self.latency_s = latency_s

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        time.sleep(self.latency_s)  # slow storage: a network filesystem's round trips
        img = np.frombuffer(zlib.decompress(self.files[i]), np.uint8).reshape(64, 64, 3)
        x = img.astype(np.float32) / 255.0
        x = x.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))  # 2x2 box resize
        x = (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-6)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), self.labels[i]


def make_loader(ds: Dataset, batch_size: int, workers: int) -> DataLoader:
    # persistent_workers keeps each worker's LMDB environment (and page cache) warm
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def run_epoch(loader: DataLoader) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for images, labels in loader:
        flip = torch.rand(images.shape[0]) < 0.5  # augmentation after the cache
        images[flip] = images[flip].flip(-1)
        n += labels.numel()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="samples (default 4000)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cache", default=None, help="cache directory (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the cache directory afterwards")
    args = ap.parse_args()

    path = args.cache or os.path.join(tempfile.mkdtemp(prefix="kvcache-demo-"), "cache")
    if os.path.exists(path):
        shutil.rmtree(path)
    source = SyntheticImages(args.n)
    print(f"kvcache demo: {args.n:,} synthetic images (compressed 64x64 RGB -> float32 3x32x32), "
          f"DataLoader(batch_size={args.batch_size}, num_workers={args.workers}, shuffle=True)")

    t_src, _ = run_epoch(make_loader(source, args.batch_size, args.workers))
    print(f"  uncached source, one epoch:   {t_src:6.2f} s  {args.n / t_src:10,.0f} items/s")

    ds = LmdbCachedDataset(source, path)
    loader = make_loader(ds, args.batch_size, args.workers)
    t1, n1 = run_epoch(loader)
    print(f"  epoch 1 (computes + caches):  {t1:6.2f} s  {n1 / t1:10,.0f} items/s"
          f"   ({t1 / t_src:.2f}x the uncached epoch)")
    times = []
    for _ in range(2):
        t, n = run_epoch(loader)
        times.append(t)
    t2 = min(times)
    print(f"  epoch 2+ (from the cache):    {t2:6.2f} s  {n / t2:10,.0f} items/s"
          f"   -> {t_src / t2:.1f}x faster than the source")

    del loader  # stops the persistent workers (each has committed its samples already)
    ds.close()
    # what the next run does: a new dataset object over the same source and path
    again = LmdbCachedDataset(SyntheticImages(args.n), path)
    loader = make_loader(again, args.batch_size, args.workers)
    t3, n3 = run_epoch(loader)
    del loader
    again.close()
    print(f"  next run, its epoch 1:        {t3:6.2f} s  {n3 / t3:10,.0f} items/s"
          f"   -> {t_src / t3:.1f}x (the cache is reused across runs)")
    with open_cache(path) as view:
        info = view.info()
    kept = bool(args.cache or args.keep)
    print(f"  cache: {path}: {info.entries:,} samples, {info.total_bytes / 2**20:.1f} MiB of records, "
          f"{info.file_bytes / 2**20:.1f} MiB file; "
          + ("kept for later runs" if kept else "deleted now (a temporary directory: --keep or --cache DIR keeps it)"))
    if not kept:
        shutil.rmtree(os.path.dirname(path))

if __name__ == "__main__":
    main()
