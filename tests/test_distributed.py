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


def test_a_one_process_launch_leaves_no_rank_behind(monkeypatch):
    import os

    from sparsefusion.distributed import launch, under_torchrun
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    launch(lambda rank: seen.append((rank.rank, rank.world_size, rank.is_main)), 1, port=9)
    assert seen == [(0, 1, True)] and not under_torchrun() and "RANK" not in os.environ
