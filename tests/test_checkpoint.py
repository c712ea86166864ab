import pytest
import torch

from sparsefusion.checkpoint import load_file, load_state_dict_strict, save_atomic
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
