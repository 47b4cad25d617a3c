"""The samples of tests/data/format1/, a cache written by kvcache format 1 (main at commit
a2fd400, before compression and keyed caches). Regenerate it only with that code:

    git worktree add /tmp/kv1 a2fd400 && cd /tmp/kv1 && \\
        python /path/to/tests/data/format1_samples.py /path/to/tests/data/format1
"""

from __future__ import annotations

import sys

import numpy as np
import torch

N = 12
FINGERPRINT = "format1-fixture"


def sample(i: int):
    rng = np.random.default_rng(i)
    if i % 3 == 0:
        return (np.tile(np.arange(32, dtype=np.uint8), (3, 32, 1)) + i, i)  # a 3 KiB overflow record
    if i % 3 == 1:
        return {"tokens": torch.from_numpy(rng.integers(0, 50, 40 + i)), "bf": torch.ones(3, dtype=torch.bfloat16) * i,
                "name": f"item{i}", "f": np.float32(i) / 3}
    return [rng.standard_normal((4, 5)).astype(np.float32), None, b"raw", 1.5, True]


class Source(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return sample(i)


if __name__ == "__main__":
    from kvcache import LmdbCachedDataset

    ds = LmdbCachedDataset(Source(), sys.argv[1], fingerprint=FINGERPRINT, map_size=1 << 20)
    for i in range(N):
        ds[i]
    ds.close()
