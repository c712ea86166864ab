import io
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from sparsefusion.external.autoencoder_kl import (
    AttnBlock,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    Downsample,
)
from sparsefusion.errors import UserError
from sparsefusion.vae import (
    LatentCodec,
    LatentCodecConfig,
    convert_diffusers_vae_state_dict,
    convert_to_diffusers_vae_state_dict,
    load_latent_codec,
    load_vae,
)

KEYS_TSV = Path(__file__).parent / "data" / "keys_sd-v1-3-vae.tsv"  # the released VAE's keys and shapes
TINY = AutoencoderKLConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
# SD's level structure (f = 8) at a width that runs fast on a CPU.
NARROW_SD = AutoencoderKLConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=4)
# Keys and shapes of sd-v1-3-vae.ckpt (prefix first_stage_model. removed).
KEYS_MD_SAMPLE = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.1.conv2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
# Stand-ins for the diffusion UNet's, EMA's and text encoder's keys of a real SD v1 checkpoint.
OTHER_SD_KEYS = {
    "betas": torch.linspace(1e-4, 2e-2, 10),
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(5, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(5),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
}


def shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def meta_sd_vae():
    with torch.device("meta"):
        return AutoencoderKL()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


# ------------------------------------------------------------------ architecture

def test_sd_vae_names_and_shapes_match_the_released_checkpoint():
    state = shapes(meta_sd_vae().state_dict())
    assert len(state) == 248
    assert sum(np.prod(shape) for shape in state.values()) == 83_653_863
    assert {key: state.get(key) for key in KEYS_MD_SAMPLE} == KEYS_MD_SAMPLE
    assert "decoder.up.0.upsample.conv.weight" not in state and "encoder.down.3.downsample.conv.weight" not in state


def test_sd_vae_state_dict_equals_the_full_key_list():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    expected = {key[len("first_stage_model."):]: tuple(eval(shape)) for key, shape, *_ in rows
                if key.startswith("first_stage_model.")}
    assert shapes(meta_sd_vae().state_dict()) == expected


def test_image_to_latent_to_image_shapes():
    codec = LatentCodec(AutoencoderKL(NARROW_SD))
    with torch.no_grad():
        latents = codec.encode_images(torch.rand(2, 3, 256, 256))
        images = codec.decode_latents(latents)
    assert latents.shape == (2, 4, 32, 32) and latents.dtype == torch.float32
    assert images.shape == (2, 3, 256, 256) and images.min() >= 0 and images.max() <= 1


def test_attention_equals_an_explicit_softmax():
    block = AttnBlock(8, groups=2).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = (proj(h).flatten(2) for proj in (block.q, block.k, block.v))  # (B, C, HW)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8 ** 0.5, dim=-1)  # (B, HW query, HW key)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(attended))


def test_downsample_pads_only_bottom_and_right():
    down = Downsample(1)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap reads the window's first pixel
        assert torch.equal(down(x), x[..., ::2, ::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap runs into the zero padding at the end
        assert torch.equal(down(x), F.pad(x[..., 2::2, 2::2], (0, 1, 0, 1)))


def test_posterior_splits_mean_and_clamped_logvar():
    mean = torch.randn(2000, 2, 1, 1)
    logvar = torch.tensor([-40.0, 1.0]).view(1, 2, 1, 1).expand(2000, 2, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean)
    assert torch.equal(posterior.logvar[0, :, 0, 0], torch.tensor([-30.0, 1.0]))
    noise = posterior.sample(torch.Generator().manual_seed(0)) - mean
    assert noise[:, 0].abs().max() < 1e-5  # std = exp(-15)
    assert abs(noise[:, 1].std().item() - np.exp(0.5)) < 0.1


# ------------------------------------------------------------------ the codec

def test_codec_scales_the_posterior_mode_and_maps_ranges():
    vae = AutoencoderKL(TINY)
    codec = LatentCodec(vae, LatentCodecConfig(precision="fp32"))
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        latents = codec.encode_images(images)
        torch.testing.assert_close(latents, vae.encode(images * 2 - 1).mean * 0.18215)
        torch.testing.assert_close(codec.decode_latents(latents),
                                   (vae.decode(latents / 0.18215) * 0.5 + 0.5).clamp(0, 1))
    assert not any(p.requires_grad for p in codec.parameters())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_stays_close_to_fp32(device):
    config = TINY if device == "cpu" else AutoencoderKLConfig()
    size = 32 if device == "cpu" else 256
    vae = AutoencoderKL(config).to(device)
    fp32, bf16 = (LatentCodec(vae, LatentCodecConfig(precision=p)) for p in ("fp32", "bf16"))
    images = torch.rand(1, 3, size, size, device=device)
    with torch.no_grad():
        latents = fp32.encode_images(images)
        latent_error = (bf16.encode_images(images) - latents).norm() / latents.norm()
        decoded = vae.decode(latents / 0.18215)
        with torch.autocast(device, dtype=torch.bfloat16):
            decoded_bf16 = vae.decode(latents / 0.18215).float()
    # Random weights; on a CPU the tiny model gives about 1 % (latents) and 2-4 % (decoder output).
    assert latent_error < 5e-2
    assert (decoded_bf16 - decoded).norm() / decoded.norm() < 5e-2


def test_channels_last_gives_the_same_latents_and_images():
    vae = AutoencoderKL(TINY)
    plain = LatentCodec(vae, LatentCodecConfig(precision="fp32"))
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        latents = plain.encode_images(images)
        decoded = plain.decode_latents(latents)
        nhwc = LatentCodec(vae, LatentCodecConfig(precision="fp32", channels_last=True))
        torch.testing.assert_close(nhwc.encode_images(images), latents)
        torch.testing.assert_close(nhwc.decode_latents(latents), decoded)


def test_codec_rejects_bad_precision_and_sizes():
    with pytest.raises(ValueError, match="'fp32', 'bf16'"):
        LatentCodec(AutoencoderKL(TINY), LatentCodecConfig(precision="fp16"))
    with pytest.raises(ValueError, match="multiples of 2"):
        LatentCodec(AutoencoderKL(TINY)).encode_images(torch.rand(1, 3, 15, 16))


# ------------------------------------------------------------------ diffusers names

def test_diffusers_map_covers_every_key_both_ways():
    ldm = meta_sd_vae().state_dict()
    hf = convert_to_diffusers_vae_state_dict(ldm)
    assert len(hf) == 248
    unchanged = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                 "post_quant_conv"}
    assert all(key.rpartition(".")[0] in unchanged for key in set(hf) & set(ldm))
    assert hf["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == ldm["decoder.up.3.upsample.conv.weight"].shape
    assert hf["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (512, 512)
    assert hf["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.conv_norm_out.bias" in hf and "encoder.down_blocks.2.downsamplers.0.conv.bias" in hf
    assert shapes(convert_diffusers_vae_state_dict(hf)) == shapes(ldm)
    assert list(convert_diffusers_vae_state_dict(hf)) == list(ldm)


def test_pre_014_diffusers_attention_names_convert_too():
    ldm = AutoencoderKL(TINY).state_dict()
    legacy = {
        key.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): value
        for key, value in convert_to_diffusers_vae_state_dict(ldm, TINY).items()
    }
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    back = convert_diffusers_vae_state_dict(legacy, TINY)
    assert list(back) == list(ldm) and all(torch.equal(back[key], ldm[key]) for key in ldm)


def test_outputs_equal_diffusers_autoencoder_kl():
    diffusers = pytest.importorskip("diffusers")
    ours = AutoencoderKL(TINY).eval()
    theirs = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
                                     up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                                     latent_channels=4, norm_num_groups=4).eval()
    theirs.load_state_dict(convert_to_diffusers_vae_state_dict(ours.state_dict(), TINY), strict=True)
    x, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, theirs.encode(x).latent_dist.mean)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample)


# ------------------------------------------------------------------ checkpoint layouts

@contextmanager
def fake_modules(classes):
    """Install importable modules holding the given {'module.path': {'Name': class}} while inside."""
    names = set()
    for module_path in classes:
        parts = module_path.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for module_path, members in classes.items():
        for name, cls in members.items():
            cls.__module__, cls.__qualname__ = module_path, name
            setattr(sys.modules[module_path], name, cls)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def write_sd_v1_checkpoint(path, vae):
    """Write vae in the layout of a real SD v1 file, Lightning callback and numpy scalars included."""
    class ModelCheckpoint:
        pass

    state = {f"first_stage_model.{key}": value for key, value in vae.state_dict().items()}
    with fake_modules({"pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": ModelCheckpoint}}):
        torch.save({
            "epoch": 5,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": {**OTHER_SD_KEYS, **state},
            "callbacks": {ModelCheckpoint: {"best_model_score": None, "monitor": None}},
            "lr_schedulers": [{"last_f": np.float64(0.5), "cum_cycles": np.arange(3)}],
        }, path)


def test_sd_v1_checkpoint_with_lightning_objects_loads(tmp_path):
    vae = AutoencoderKL(TINY)
    path = tmp_path / "sd-v1-3-vae.ckpt"
    write_sd_v1_checkpoint(path, vae)
    with pytest.raises(Exception, match="pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"):
        torch.load(path, weights_only=True)
    assert "pytorch_lightning" not in sys.modules
    assert_same_weights(load_vae(path, TINY), vae)


def test_vae_only_files_load(tmp_path):
    vae = AutoencoderKL(TINY)
    torch.save(vae.state_dict(), tmp_path / "plain.pt")
    assert_same_weights(load_vae(tmp_path / "plain.pt", TINY), vae)
    leftovers = {"loss.logvar": torch.zeros(()), "model_ema.num_updates": torch.tensor(3)}
    torch.save({"state_dict": {**vae.state_dict(), **leftovers}}, tmp_path / "ldm.ckpt")
    assert_same_weights(load_vae(tmp_path / "ldm.ckpt", TINY), vae)
    safetensors.torch.save_file(vae.state_dict(), tmp_path / "ldm.safetensors")
    assert_same_weights(load_vae(tmp_path / "ldm.safetensors", TINY), vae)


def test_diffusers_safetensors_load(tmp_path):
    vae = AutoencoderKL(TINY)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(convert_to_diffusers_vae_state_dict(vae.state_dict(), TINY), path)
    assert_same_weights(load_vae(path, TINY), vae)
    codec = load_latent_codec(path, vae_config=TINY, config=LatentCodecConfig(precision="fp32"))
    images = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(codec.encode_images(images), vae.encode(images * 2 - 1).mode() * 0.18215)


def test_missing_file_names_where_to_get_it(tmp_path):
    with pytest.raises(UserError) as err:
        load_vae(tmp_path / "sd" / "sd-v1-3-vae.ckpt")
    message = str(err.value)
    assert str(tmp_path / "sd" / "sd-v1-3-vae.ckpt") in message
    assert ("huggingface.co/CompVis/stable-diffusion-v-1-3-original (sd-v1-3.ckpt renamed to sd-v1-3-vae.ckpt) "
            "into checkpoints/sd/") in message


def test_missing_and_misshaped_keys_are_named(tmp_path):
    state = {f"first_stage_model.{k}": v for k, v in AutoencoderKL(TINY).state_dict().items()}
    del state["first_stage_model.decoder.mid.attn_1.q.bias"]
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 4, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(UserError, match=r"missing \[decoder.mid.attn_1.q.bias\].*quant_conv.weight: expected"):
        load_vae(tmp_path / "broken.ckpt", TINY)


def test_other_pickled_globals_are_refused(tmp_path):
    class Payload:
        pass

    with fake_modules({"evil.payload": {"Payload": Payload}}):
        buffer = io.BytesIO()
        torch.save({"state_dict": AutoencoderKL(TINY).state_dict(), "extra": Payload()}, buffer)
    (tmp_path / "evil.ckpt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="(?s)could not be read.*evil.payload.Payload"):
        load_vae(tmp_path / "evil.ckpt", TINY)


# ------------------------------------------------------------------ a small VAE learns

def rectangle_images(n, size, generator):
    """Return (n, 3, size, size) in [0, 1]: a flat background with three flat axis-aligned rectangles."""
    rows, cols = torch.arange(size).view(size, 1), torch.arange(size).view(1, size)
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size)
    for _ in range(3):
        top, left = torch.randint(0, size - 8, (2, n, 1, 1), generator=generator)
        height, width = torch.randint(6, size // 2, (2, n, 1, 1), generator=generator)
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)  # (n, size, size)
        images = torch.where(inside[:, None], torch.rand(n, 3, 1, 1, generator=generator), images)
    return images


def gaussian_blur(images, sigma):
    """Return images (B, C, H, W) blurred by a separable Gaussian of std sigma pixels, edges replicated."""
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2))
    taps = (taps / taps.sum()).repeat(images.shape[1], 1, 1, 1)  # (C, 1, 1, K)
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, taps, groups=images.shape[1])
    return F.conv2d(rows, taps.transpose(2, 3), groups=images.shape[1])


def test_small_vae_learns_to_reconstruct_better_than_a_blur():
    images = rectangle_images(4, 32, torch.Generator().manual_seed(0))
    vae = AutoencoderKL(AutoencoderKLConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    steps, lr = 250, 2e-3
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        reconstruction, _ = vae(images * 2 - 1, sample_posterior=False)
        loss = F.mse_loss(reconstruction, images * 2 - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        codec = LatentCodec(vae, LatentCodecConfig(precision="fp32"))
        error = F.mse_loss(codec.decode_latents(codec.encode_images(images)), images)
        assert torch.allclose(codec.reconstruct(images, batch=3), codec.decode_latents(codec.encode_images(images)),
                              atol=1e-6)  # in batches as in one
    # The baseline keeps what a blur at the latent grid's scale (f = 2 pixels, sigma = f / 2) keeps.
    assert error < 0.25 * F.mse_loss(gaussian_blur(images, 1.0), images)
