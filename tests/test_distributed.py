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


def test_port_digits_are_checked():
    from sparsefusion.distributed import check_port

    check_port(0)
    for port in (10, -1):
        with pytest.raises(UserError, match="must be a single digit 0-9"):
            check_port(port)


def test_the_rendezvous_store_listens_on_the_loopback_only():
    from sparsefusion.distributed import loopback_store

    store = loopback_store(12348, rank=0, world_size=1)
    listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{12348:04X}" in listening and f"00000000:{12348:04X}" not in listening
    del store


def _every_rank_fails(rank):
    raise UserError("the dataset is missing (said by every rank)")


def _rank_1_is_killed(rank):
    import os
    import signal
    import time

    if rank.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_a_user_error_of_every_rank_is_reported_once_and_a_killed_rank_by_its_signal(monkeypatch):
    from sparsefusion.distributed import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(UserError) as err:
        launch(_every_rank_fails, 2, port=6)
    assert str(err.value) == "the dataset is missing (said by every rank)"
    with pytest.raises(UserError) as err:
        launch(_rank_1_is_killed, 2, port=6)
    assert str(err.value).startswith("process 1 of 2 was killed by SIGKILL and said nothing; SIGKILL is often the "
                                     "out-of-memory killer")
