import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsefusion.metrics import image_metrics, lpips, psnr, scene_metrics, ssim


def _image(h=24, w=20, seed=0):
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _reference_ssim(a, b):
    """SSIM of Wang et al. (2004) with 7x7 uniform windows, sample covariance, K1 0.01, K2 0.03, range 1."""
    x = torch.from_numpy(a).double().permute(2, 0, 1)[None]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[None]
    mean = lambda t: F.avg_pool2d(t, 7, stride=1)  # valid windows only, as scikit-image crops its border
    mx, my = mean(x), mean(y)
    unbias = 49 / 48
    vx, vy = unbias * (mean(x * x) - mx**2), unbias * (mean(y * y) - my**2)
    cxy = unbias * (mean(x * y) - mx * my)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def test_psnr_has_peak_one_for_float_images():
    gt = 0.9 * _image()
    pred = gt + np.float32(0.1)  # mse 0.01 everywhere: 20 dB at peak 1
    assert psnr(pred, gt) == pytest.approx(20.0, abs=1e-4)
    noisy = np.clip(gt + 0.05 * _image(seed=1), 0, 1)
    mse = np.mean((noisy.astype(np.float64) - gt) ** 2)
    assert psnr(noisy, gt) == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)


def test_ssim_matches_the_formula_per_channel_with_range_one():
    gt = _image()
    pred = np.clip(gt + 0.4 * (_image(seed=1) - 0.5), 0, 1).astype(np.float32)
    assert ssim(gt, gt) == pytest.approx(1.0)
    assert ssim(pred, gt) == pytest.approx(_reference_ssim(pred, gt), abs=1e-5)
    assert ssim(pred, gt) < 0.95


class _RecordingLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: returns the mean absolute difference and keeps its inputs."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, in0, in1):
        self.inputs = (in0, in1)
        return (in0 - in1).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_wrapper_gives_ground_truth_first_in_minus_one_to_one():
    gt, pred = _image(), _image(seed=1)
    model = _RecordingLPIPS()
    value = lpips(model, pred, gt)
    in0, in1 = model.inputs
    assert in0.shape == (1, 3, 24, 20)
    assert torch.allclose(in0[0].permute(1, 2, 0), torch.from_numpy(2 * gt - 1))
    assert torch.allclose(in1[0].permute(1, 2, 0), torch.from_numpy(2 * pred - 1))
    assert value == pytest.approx(2 * np.abs(gt - pred).mean(), rel=1e-5)


def test_scene_metrics_are_frame_means_on_channel_last_arrays():
    gts = torch.rand(3, 3, 24, 20)
    preds = (gts + 0.1 * torch.randn(3, 3, 24, 20)).clamp(0, 1)
    result = scene_metrics(preds, gts, _RecordingLPIPS())
    hwc = lambda images, i: images[i].permute(1, 2, 0).numpy()
    expected = [image_metrics(hwc(preds, i), hwc(gts, i), _RecordingLPIPS()) for i in range(3)]
    for frame, expected_frame in zip(result["frames"], expected):
        assert frame == pytest.approx(expected_frame)
    for key in ("psnr", "ssim", "lpips"):
        assert result[key] == pytest.approx(np.mean([frame[key] for frame in expected]))
    mse = ((preds.double() - gts.double()) ** 2).mean(dim=(1, 2, 3))
    assert result["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-6)


def test_scene_metrics_without_lpips_and_bad_shapes():
    gts = torch.rand(2, 3, 16, 16)
    result = scene_metrics(gts.flip(0), gts)
    assert result["lpips"] is None and result["ssim"] < 0.1
    assert all(frame["lpips"] is None for frame in result["frames"])
    with pytest.raises(ValueError, match="preds and gts"):
        scene_metrics(gts, gts[:1])
