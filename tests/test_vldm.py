"""The VLDM: released key layout, training loss, checkpoints, fast paths, and a tiny model that learns."""

import math
from pathlib import Path

import pytest
import torch

from sparsefusion.external.imagen_unet import PixelShuffleUpsample, Unet, UnetConfig
from sparsefusion.errors import UserError
from sparsefusion.fast_unet import FastPathConfig, PaddedBatches, PreparedUnet, fast_unet
from sparsefusion.schedule import COSINE_S, cosine_log_snr, q_sample
from sparsefusion.checkpoint import load_file, load_training_state, model_checkpoint, save_atomic
from sparsefusion.joint_objective import adam_with_step_lr
from sparsefusion.training import TrainConfig
from sparsefusion.vldm import VLDM, VLDMConfig, save_vldm

# Keys, shapes and dtypes of the released ckpt_latest.pt's model_state_dict, in its order.
RELEASED_KEYS = Path(__file__).parent / "data" / "keys_ckpt_latest.tsv"




def small_vldm(sample_steps=6, **unet_overrides):
    config = VLDMConfig(unet=UnetConfig.small(**unet_overrides), image_size=8, sample_steps=sample_steps, plms_steps=4)
    return VLDM(config)


def randomise_final_conv(vldm):
    """A fresh UNet predicts ε̂ = 0 (zero-initialised final conv); give it something to say."""
    torch.nn.init.normal_(vldm.unet.final_conv.weight, std=0.2)
    return vldm


def inputs(batch=2, size=8, cond_channels=3):
    """Return (latents, log-SNRs, EFT-like features) of a batch."""
    cond = torch.randn(batch, cond_channels, size, size)
    return torch.randn(batch, 4, size, size), torch.linspace(-4, 6, batch), cond


def test_full_size_model_has_the_released_keys_and_shapes():
    with torch.device("meta"):
        vldm = VLDM()
    ours = [(key, tuple(value.shape)) for key, value in vldm.state_dict().items()]
    rows = [line.split("\t") for line in RELEASED_KEYS.read_text().splitlines()[1:]]
    released = [(key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip())) for key, shape, *_ in rows]
    assert ours == released
    assert len(ours) == 477
    assert sum(math.prod(shape) for _, shape in ours) == 400_675_357
    assert not list(vldm.buffers())


def test_fresh_unet_predicts_zero_noise():
    unet = Unet(UnetConfig.small())
    assert unet(*inputs()).abs().max() == 0


def test_pixel_shuffle_upsample_starts_as_nearest_neighbour():
    up = PixelShuffleUpsample(3, 5)
    out = up(torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(out, torch.repeat_interleave(torch.repeat_interleave(out[..., ::2, ::2], 2, -1), 2, -2))


def test_sdpa_attention_computes_the_explicit_softmax():
    sdpa, math_ = small_vldm(attention="sdpa"), small_vldm(attention="math")
    math_.load_state_dict(randomise_final_conv(sdpa).state_dict())
    x, log_snr, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sdpa.unet(x, log_snr, cond), math_.unet(x, log_snr, cond), rtol=1e-5, atol=1e-5)


def test_time_tokens_reach_the_attention_layers():
    # The last stage's transformer and the middle cross-attention attend to the time tokens: changing
    # only their projection changes the output.
    vldm = randomise_final_conv(small_vldm())
    x, log_snr, cond = inputs()
    with torch.no_grad():
        before = vldm.unet(x, log_snr, cond)
        vldm.unet.to_time_tokens[0].weight.add_(torch.randn_like(vldm.unet.to_time_tokens[0].weight))
        assert (vldm.unet(x, log_snr, cond) - before).abs().max() > 1e-3


def test_loss_replays_upstreams_training_step():
    vldm = randomise_final_conv(small_vldm())
    x0, _, cond = inputs(batch=4)
    loss = vldm(x0, cond, generator=torch.Generator().manual_seed(5))

    # Upstream's draws in order: times, noise, keep-mask; then the p2-weighted ε-MSE.
    generator = torch.Generator().manual_seed(5)
    times = torch.empty(4).uniform_(0, 0.999, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    keep = torch.empty(4).uniform_(0, 1, generator=generator) < 0.9
    alpha_bar = torch.cos((times + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    log_snr = torch.log(alpha_bar / (1 - alpha_bar))
    a, s = alpha_bar.sqrt()[:, None, None, None], (1 - alpha_bar).sqrt()[:, None, None, None]
    pred = vldm.unet(a * x0 + s * noise, log_snr, cond * keep[:, None, None, None])
    expected = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * (1 + log_snr.exp()) ** -0.5).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


class OffsetInRegion(torch.nn.Module):
    """The UNet with its prediction changed inside a region."""

    def __init__(self, unet, region):
        super().__init__()
        self.unet, self.region = unet, region

    def forward(self, x, log_snr, cond):
        return self.unet(x, log_snr, cond) + 3.0 * self.region


def test_loss_mask_removes_the_masked_region():
    vldm = randomise_final_conv(small_vldm())
    x0, _, cond = inputs(batch=3)
    mask = torch.ones(3, 4, 8, 8)
    mask[:, :, 2:6, 1:5] = 0

    def loss(perturbed, loss_mask):
        model = small_vldm()
        model.load_state_dict(vldm.state_dict())
        if perturbed:
            model.unets[0] = OffsetInRegion(model.unet, 1 - mask)
        return model(x0, cond, loss_mask=loss_mask, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(loss(True, mask), loss(False, mask))
    assert loss(True, None) > loss(False, None) + 0.5


def test_checkpoint_round_trip_in_upstreams_layout(tmp_path):
    vldm = randomise_final_conv(small_vldm())
    optimizer, scheduler = adam_with_step_lr(vldm, TrainConfig())
    x0, _, cond = inputs()
    vldm(x0, cond).backward()
    optimizer.step()
    scheduler.step()
    path = save_atomic(model_checkpoint(vldm, 7, optimizer, scheduler), tmp_path / "ckpt_latest.pt")

    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "config",
                          "checksum"}
    assert all(key.startswith("unets.0.") for key in saved["model_state_dict"])
    assert saved["scheduler_state_dict"]["step_size"] == 50000 and saved["scheduler_state_dict"]["gamma"] == 0.5
    assert saved["optimizer_state_dict"]["param_groups"][0]["initial_lr"] == 5e-5

    loaded = VLDM.from_checkpoint(path)  # the small architecture comes from the stored config
    assert loaded.config == vldm.config
    for key, value in vldm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    resumed = small_vldm()
    optimizer2, scheduler2 = adam_with_step_lr(resumed, TrainConfig())
    load_training_state(resumed, load_file(path, "VLDM checkpoint"), optimizer2, scheduler2, "VLDM checkpoint")
    assert scheduler2.last_epoch == 1
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(optimizer2.state_dict()["state"][index]["exp_avg"], state["exp_avg"])
    weights_only = load_file(save_vldm(vldm, tmp_path / "weights.pt"), "VLDM checkpoint")
    assert set(weights_only) == {"step", "model_state_dict", "config", "checksum"}


def test_checkpoint_loading_is_strict(tmp_path):
    state = small_vldm().state_dict()
    state.pop("unets.0.final_conv.bias")
    torch.save({"model_state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="missing.*unets.0.final_conv.bias"):
        VLDM.from_checkpoint(tmp_path / "partial.pt", small_vldm().config)
    torch.save({"state_dict": state}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="model_state_dict"):
        small_vldm().load_checkpoint(tmp_path / "other.pt")


def test_sampling_is_reproducible_with_a_generator():
    vldm = randomise_final_conv(small_vldm())
    _, _, cond = inputs()
    for sampler in ("ancestral", "plms"):
        a, b = [vldm.sample(cond, sampler, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
        assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
    x0, x_noisy, noise, alpha_bar = vldm.denoise(inputs()[0], cond, 0.3, generator=torch.Generator().manual_seed(1))
    assert x0.shape == x_noisy.shape == noise.shape == (2, 4, 8, 8) and alpha_bar.shape == (2,)


def test_bf16_channels_last_path_stays_close_to_fp32_on_cpu():
    vldm = randomise_final_conv(small_vldm())
    x, log_snr, cond = inputs()
    fast = fast_unet(vldm.unet, FastPathConfig(precision="bf16", channels_last=True, cuda_graph=False))
    with torch.no_grad():
        reference = vldm.unet(x, log_snr, cond)
        out = fast(x, log_snr, cond)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert ((out - reference).norm() / reference.norm()).item() < 0.05  # bf16 rounding; gross errors are O(1)
    assert vldm.unet.final_conv.weight.dtype == torch.float32  # the given UNet is left as it was
    assert isinstance(fast, PreparedUnet) and fast.unet.to_time_hiddens[0].weights.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager_on_new_inputs():
    vldm = randomise_final_conv(small_vldm()).cuda()
    graphed = fast_unet(vldm.unet, FastPathConfig(precision="fp32", channels_last=False, cuda_graph=True))
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        x, log_snr, cond = (v.cuda() for v in inputs())
        with torch.no_grad():
            torch.testing.assert_close(graphed(x, log_snr, cond), vldm.unet(x, log_snr, cond), rtol=1e-4, atol=1e-5)
        outs.append(graphed(x, log_snr, cond))
    assert not torch.equal(outs[0], outs[1])  # earlier outputs are not overwritten by later replays


def test_padded_batches_run_a_few_sizes_and_return_each_rows_own_result():
    seen = []

    def model(x, log_snr, cond):
        seen.append(x.shape[0])
        return x * log_snr.view(-1, 1, 1, 1) + cond

    padded = PaddedBatches(model, 12)
    assert padded.sizes == [1, 2, 4, 8, 12]
    for batch in (12, 11, 7, 5, 3, 1, 20):
        x, log_snr, cond = torch.randn(batch, 4, 2, 2), torch.randn(batch), torch.randn(batch, 4, 2, 2)
        assert torch.equal(padded(x, log_snr, cond), model(x, log_snr, cond))
    assert set(seen) == {12, 8, 4, 1, 20, 11, 7, 5, 3}  # the direct calls above add the odd sizes
    assert seen[0::2] == [12, 12, 8, 8, 4, 1, 20]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fast_cuda_path_stays_close_to_fp32():
    vldm = randomise_final_conv(small_vldm()).cuda()
    x, log_snr, cond = (v.cuda() for v in inputs())
    fast = vldm.fast_model()
    with torch.no_grad():
        reference = vldm.unet(x, log_snr, cond)
    assert ((fast(x, log_snr, cond) - reference).norm() / reference.norm()).item() < 0.03


def toy_batch(batch, generator):
    """Latents ≈ 0.8 · a random ±1 pattern that the conditioning features show (the same in every channel)."""
    pattern = torch.randint(0, 2, (batch, 1, 8, 8), generator=generator).float() * 2 - 1
    return 0.8 * pattern + 0.1 * torch.randn(batch, 4, 8, 8, generator=generator), pattern.expand(batch, 3, 8, 8)


def test_tiny_unet_learns_a_toy_conditional_distribution():
    vldm = small_vldm(sample_steps=20)
    optimizer = torch.optim.Adam(vldm.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        loss = vldm(*toy_batch(16, data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])

    x0, cond = toy_batch(32, data)
    noise = torch.randn(x0.shape, generator=data)
    log_snr = cosine_log_snr(torch.full((32,), 0.5))
    with torch.no_grad():
        x_t = q_sample(x0, log_snr, noise)
        right, wrong = [((vldm.unet(x_t, log_snr, c) - noise) ** 2).mean() for c in (cond, -cond)]
        samples = vldm.sample(cond, generator=torch.Generator().manual_seed(0))
    assert right < 0.3 * wrong  # the prediction follows the conditioning features
    assert (samples * cond[:, :1]).mean() > 0.5  # samples show the pattern (0.8 for a perfect model)
