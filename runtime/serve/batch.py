"""The KV cache of a running batch, on the host, while rows join and leave (docs/serving.md).

Rows are left-padded: every row's newest position is the last column, and the mask marks
the padding on the left with 0. A decode step appends one column for every row, which keeps
that layout; only when rows join or leave does the cache come to the host as `HostRows`
(Backend.cache_to_host), get regrouped here, and go back (Backend.cache_from_host).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class HostRows:
    """B rows of a left-padded cache: one [B,kv,W,hd] array per past input, mask [B,W] int64."""

    arrays: list[np.ndarray]
    mask: np.ndarray

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def select(self, rows: list[int]) -> HostRows:
        """These rows only, without the columns that are padding in all of them."""
        mask = self.mask[rows]
        live = np.flatnonzero(mask.any(axis=0))
        start = int(live[0]) if len(live) else mask.shape[1]
        return HostRows([array[rows, :, start:] for array in self.arrays], mask[:, start:])

    def padded_to(self, width: int) -> HostRows:
        """The same rows with zero columns added on the left up to `width`."""
        extra = width - self.width
        if extra == 0:
            return self
        arrays = [np.pad(array, ((0, 0), (0, 0), (extra, 0), (0, 0))) for array in self.arrays]
        return HostRows(arrays, np.pad(self.mask, ((0, 0), (extra, 0))))


def stack(parts: list[HostRows]) -> HostRows:
    """Parts one after another along the batch, each left-padded to the widest part."""
    width = max(part.width for part in parts)
    padded = [part.padded_to(width) for part in parts]
    arrays = [np.concatenate(tensors, axis=0) for tensors in zip(*(part.arrays for part in padded))]
    return HostRows(arrays, np.concatenate([part.mask for part in padded], axis=0))
