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
        if start == 0 and rows == list(range(len(self.mask))):
            return self  # every row stays and no column is all padding: no copy
        return HostRows([array[rows, :, start:] for array in self.arrays], mask[:, start:])


def stack(parts: list[HostRows]) -> HostRows:
    """Parts one after another along the batch, each left-padded to the widest part: one
    copy of every part into arrays allocated once."""
    width = max(part.width for part in parts)
    rows = sum(len(part.mask) for part in parts)
    arrays = [np.zeros((rows, a.shape[1], width, a.shape[3]), dtype=a.dtype) for a in parts[0].arrays]
    mask = np.zeros((rows, width), dtype=np.int64)
    row = 0
    for part in parts:
        end, start = row + len(part.mask), width - part.width  # right-aligned: padding on the left
        for merged, array in zip(arrays, part.arrays):
            merged[row:end, :, start:] = array
        mask[row:end, start:] = part.mask
        row = end
    return HostRows(arrays, mask)
