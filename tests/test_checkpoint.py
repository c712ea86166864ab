import os

import pytest
import torch

from sparsefusion import checkpoint_commit
from sparsefusion.checkpoint import content_checksum, load_file, load_state_dict_strict, save_atomic
from sparsefusion.checkpoint_commit import finish_interrupted_commits, remove_uncommitted, save_together
from sparsefusion.errors import UserError


def test_round_trip_and_atomic_save(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = save_atomic({"model_state_dict": net.state_dict()}, tmp_path / "sub" / "ckpt.pt")
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    other = load_state_dict_strict(torch.nn.Linear(3, 2), load_file(path, "test")["model_state_dict"], "test")
    assert torch.equal(other.weight, net.weight)


def test_strict_load_names_every_bad_key():
    state = torch.nn.Linear(3, 2).state_dict()
    state["extra"] = torch.zeros(1)
    state["weight"] = torch.zeros(5, 3)
    del state["bias"]
    with pytest.raises(UserError) as err:
        load_state_dict_strict(torch.nn.Linear(3, 2), state, "my ckpt")
    message = str(err.value)
    assert "missing [bias]" in message and "unexpected [extra]" in message
    assert "weight: expected (2, 3), got (5, 3)" in message


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="EFT checkpoint not found at .*get it from the drive"):
        load_file(tmp_path / "nope.pt", "EFT checkpoint", "the drive")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_file(bad, "EFT checkpoint")


def test_configs_round_trip_through_a_checkpoint(tmp_path):
    from sparsefusion.external.imagen_unet import UnetConfig
    from sparsefusion.checkpoint import config_from_dict, config_to_dict, stored_config
    from sparsefusion.vldm import VLDMConfig

    config = VLDMConfig(unet=UnetConfig.small(), image_size=8)
    path = save_atomic({"config": config_to_dict(config)}, tmp_path / "c.pt")
    restored = stored_config(load_file(path, "test"), VLDMConfig)
    assert restored == config and isinstance(restored.unet, UnetConfig)
    assert isinstance(restored.unet.dim_mults, tuple)
    assert stored_config({}, VLDMConfig) == VLDMConfig()  # upstream's checkpoints store none
    with pytest.raises(UserError, match="unknown fields \\['typo'\\]"):
        config_from_dict(VLDMConfig, {"typo": 1})


def test_a_zeroed_block_inside_our_checkpoint_is_caught_by_its_checksum(tmp_path):
    weights = {"model_state_dict": {"w": torch.randn(64, 1024)}}  # 256 KiB of tensor data
    path = save_atomic(weights, tmp_path / "ckpt.pt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"EFT checkpoint at .*ckpt\.pt is corrupt: .*checksum.*restore the file"):
        load_file(path, "EFT checkpoint")


def test_released_files_without_a_checksum_load_as_they_are(tmp_path):
    torch.save({"model_state_dict": {"w": torch.ones(2)}}, tmp_path / "released.pt")
    assert torch.equal(load_file(tmp_path / "released.pt", "VLDM checkpoint")["model_state_dict"]["w"], torch.ones(2))
    resaved = save_atomic(load_file(save_atomic({"a": torch.ones(1)}, tmp_path / "ours.pt"), "x"), tmp_path / "b.pt")
    assert load_file(resaved, "x")["checksum"] == load_file(tmp_path / "ours.pt", "x")["checksum"]


def test_checksums_see_every_value_and_its_type():
    base = {"step": 3, "w": torch.zeros(2, 3), "groups": [{"lr": 1e-4}]}
    variants = [{**base, "step": 4}, {**base, "w": torch.zeros(3, 2)}, {**base, "w": torch.zeros(2, 3).double()},
                {**base, "groups": [{"lr": 2e-4}]}, {**base, "extra": None}]
    digests = {content_checksum(obj) for obj in [base] + variants}
    assert len(digests) == 1 + len(variants)


class Payload:
    def __reduce__(self):
        return os.system, ("echo owned",)


def test_a_malicious_file_is_refused_in_one_line_without_pytorch_advice(tmp_path):
    torch.save({"model_state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        load_file(tmp_path / "evil.pt", "EFT checkpoint")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "weights_only" not in message
    assert "holds a pickled object (posix.system) besides tensors, refused as unsafe" in message


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"EFT checkpoint .* is a folder, not a file; pass the checkpoint file inside"):
        load_file(tmp_path, "EFT checkpoint")


def test_pytorch_without_safe_loading_is_refused(tmp_path, monkeypatch):
    path = save_atomic({"a": torch.ones(1)}, tmp_path / "a.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(UserError, match=r"PyTorch 2\.5\.1\+cu121 .*upgrade: pip install 'torch>=2\.10'"):
        load_file(path, "EFT checkpoint")
    monkeypatch.setattr(torch, "__version__", "2.11.0")  # the GPU machines' version loads
    assert load_file(path, "EFT checkpoint")["a"] == 1


# ---------------------------------------------------------------------------------------------
# A set of files committed as one


class Killed(BaseException):
    """Fault injection: the process dies here (nothing catches a BaseException, no cleanup code runs)."""


def pair(tmp_path, step):
    return {tmp_path / "ckpt_latest.pt": {"step": step}, tmp_path / "ckpt_latest_eft.pt": {"step": step}}


def steps(tmp_path):
    return [load_file(tmp_path / name, "x")["step"] for name in ("ckpt_latest.pt", "ckpt_latest_eft.pt")]


def test_a_kill_after_the_commit_point_is_completed_at_the_next_start(tmp_path, monkeypatch):
    save_together(pair(tmp_path, 10))
    commit_renames = []

    def die_at_the_second_commit_rename(source, target):
        if not target.name.startswith("."):  # a pending file renamed over its final name
            if commit_renames:
                raise Killed
            commit_renames.append(target)
        os.rename(source, target)

    monkeypatch.setattr(os, "replace", die_at_the_second_commit_rename)  # os is the module every writer uses
    with pytest.raises(Killed):
        save_together(pair(tmp_path, 20))
    monkeypatch.undo()
    assert sorted(steps(tmp_path)) == [10, 20]  # what the old two-rename commit left behind
    assert finish_interrupted_commits(tmp_path) == [[tmp_path / "ckpt_latest.pt", tmp_path / "ckpt_latest_eft.pt"]]
    assert steps(tmp_path) == [20, 20] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_latest.pt", "ckpt_latest_eft.pt"]


def test_a_kill_before_the_commit_point_keeps_the_old_set(tmp_path, monkeypatch):
    save_together(pair(tmp_path, 10))
    monkeypatch.setattr(checkpoint_commit, "write_text", lambda *args: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        save_together(pair(tmp_path, 20))
    monkeypatch.undo()
    assert finish_interrupted_commits(tmp_path) == []
    assert [p.name for p in remove_uncommitted(tmp_path)] == [".ckpt_latest.pt.pending", ".ckpt_latest_eft.pt.pending"]
    assert steps(tmp_path) == [10, 10] and len(list(tmp_path.iterdir())) == 2
