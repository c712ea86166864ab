"""sparsefusion.export: half-precision inference copies that the loaders read back as float32."""

import hashlib
import json

import pytest
import torch

from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.external.imagen_unet import UnetConfig
from sparsefusion.checkpoint import config_to_dict
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, load_eft
from sparsefusion.errors import UserError
from sparsefusion.export import export
from sparsefusion.vae import load_latent_codec
from sparsefusion.vldm import VLDM, VLDMConfig


@pytest.fixture
def training_run(tmp_path):
    """Training checkpoints of small models as train.py writes them (optimizer states included)."""
    eft = EpipolarFeatureTransformer(EFTConfig(backbone="small", backbone_widths=(8, 8, 16), hidden_dim=16, n_layers=1))
    vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=16), image_size=4))
    torch.nn.init.normal_(vldm.unet.final_conv.weight)
    vae = AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    joint = tmp_path / "joint"
    joint.mkdir()
    for module, name in ((vldm, "ckpt_latest.pt"), (eft, "ckpt_latest_eft.pt")):
        optimizer = torch.optim.Adam(module.parameters())
        torch.save({"step": 7, "model_state_dict": module.state_dict(), "config": config_to_dict(module.config),
                    "optimizer_state_dict": optimizer.state_dict()}, joint / name)
    torch.save({"step": 3, "state_dict": vae.state_dict(), "config": config_to_dict(vae.config),
                "scale_factor": 0.5, "optimizer_state_dict": {}}, tmp_path / "ckpt_latest_vae.pt")
    return {"eft": eft, "vldm": vldm, "vae": vae, "joint": joint, "vae_path": tmp_path / "ckpt_latest_vae.pt"}


def test_exported_weights_are_float16_and_load_back_as_float32(training_run, tmp_path):
    out = tmp_path / "mini"
    export(out, vae_path=training_run["vae_path"])
    manifest = export(out, joint_dir=training_run["joint"])  # a second export adds to the manifest
    assert set(manifest) == {"vae", "eft", "vldm"}
    stored = torch.load(out / "vldm.pt", weights_only=True)
    assert set(stored) == {"step", "model_state_dict", "config", "checksum"} and stored["step"] == 7
    assert all(v.dtype == torch.float16 for v in stored["model_state_dict"].values() if v.is_floating_point())

    loaded = {"eft": load_eft(out / "eft.pt"), "vldm": VLDM.from_checkpoint(out / "vldm.pt"),
              "vae": load_latent_codec(out / "vae.pt").vae}
    for name, module in loaded.items():
        for key, value in training_run[name].state_dict().items():
            got = module.state_dict()[key]
            expected = value.half().float() if value.is_floating_point() else value
            assert got.dtype == value.dtype and torch.equal(got, expected), (name, key)
    assert load_latent_codec(out / "vae.pt").config.scale_factor == 0.5
    for name, entry in json.loads((out / "manifest.json").read_text()).items():
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
        state = training_run[name].state_dict().values()
        assert entry["float_values"] == sum(v.numel() for v in state if v.is_floating_point())


def test_a_missing_training_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match=r"EFT training checkpoint not found at .*nowhere/ckpt_latest_eft\.pt"):
        export(tmp_path / "out", joint_dir=tmp_path / "nowhere")
