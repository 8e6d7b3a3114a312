"""The even split that shares classes (head shards) and images (evaluation) among ranks."""

import numpy as np
import pytest

from sface_dist.parallel.partition import class_range, even_split, even_split_sizes


@pytest.mark.parametrize("count", [0, 1, 7, 12, 1001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_even_split_matches_numpy_array_split(count: int, world_size: int) -> None:
    items = np.arange(count)
    parts = np.array_split(items, world_size)
    shares = [even_split(count, rank, world_size) for rank in range(world_size)]
    for (start, stop), part in zip(shares, parts):
        np.testing.assert_array_equal(items[start:stop], part)
    assert shares[-1][1] == count
    assert even_split_sizes(count, world_size) == [part.size for part in parts]


def test_class_range_is_the_even_split_of_classes() -> None:
    assert [class_range(10, rank, 3) for rank in range(3)] == [(0, 4), (4, 7), (7, 10)]
