import pytest

from sparsefusion.distributed import check_gpu_count, split_list
from sparsefusion.errors import UserError


def test_split_list_covers_everything_once_in_order():
    items = list(range(7))
    parts = split_list(items, 3)
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_list([1], 3) == [[1], [], []]


def test_gpu_count_checks():
    with pytest.raises(UserError, match="at least 1"):
        check_gpu_count(0)
