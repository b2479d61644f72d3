"""The running batch's KV cache on the host: rows leave (and their padding goes), rows join
(left-padded to the widest)."""

import numpy as np

from runtime.serve.batch import HostRows, stack


def rows(lengths: list[int], width: int, fill_from: int = 1) -> HostRows:
    """Left-padded rows whose live positions hold (row id, position) codes; padding is 0."""
    arrays = [np.zeros((len(lengths), 2, width, 3), np.float32) for _ in range(2)]
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        for array in arrays:
            array[row, :, width - length :, :] = (fill_from + row) * 100 + np.arange(length)[None, :, None]
    return HostRows(arrays, mask)


def test_rows_that_leave_take_their_padding_with_them():
    batch = rows([2, 5, 3], width=5)
    kept = batch.select([0, 2])
    assert kept.width == 3  # the 5-long row left: two columns were padding in every remaining row
    assert kept.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert kept.arrays[0][1, 0, :, 0].tolist() == [300, 301, 302]
    assert kept.arrays[1][0, 1, 1:, 2].tolist() == [100, 101]


def test_no_rows_left_is_an_empty_batch():
    assert rows([2], width=4).select([]).arrays[0].shape == (0, 2, 0, 3)


def test_joining_rows_are_padded_to_the_widest_and_keep_their_positions():
    running = rows([4, 2], width=4)
    newcomer = rows([6], width=6, fill_from=7)
    merged = stack([running, newcomer])
    assert merged.width == 6
    assert merged.mask.sum(axis=1).tolist() == [4, 2, 6]
    assert (merged.mask[:, -1] == 1).all()  # every row's newest position is the last column
    assert merged.arrays[0][0, 0, 2:, 0].tolist() == [100, 101, 102, 103]
    assert merged.arrays[0][0, 0, :2].sum() == 0
    assert merged.arrays[1][2, 1, :, 1].tolist() == [700, 701, 702, 703, 704, 705]
