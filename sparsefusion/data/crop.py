"""Crop a frame around its foreground box and resize it, adjusting the camera to match.

This is what PyTorch3D implicitron's JsonIndexDataset does for CO3D with box_crop=True (upstream's
CO3Dv2Wrapper uses it unchanged): threshold the foreground probability, take the tight box of the
foreground pixels, grow it by box_crop_context of its size, clamp it to the image and round it, cut
it out, scale it to fit the output size keeping its aspect ratio, and zero-pad the rest (bottom and
right). The camera follows through pixel intrinsics.

Pixel coordinates here are continuous with the image spanning [0, W] × [0, H] (pixel (i, j) has its
centre at (j + 0.5, i + 0.5)), as sparsefusion.cameras.ndc_to_screen uses them. In these coordinates
cropping at an integer offset is a translation and align_corners=False resizing a pure scaling, so a
camera adjusted by the same translation and scaling projects every point exactly where the crop and
resize move its pixel.
"""

import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.config import check_choice

RESIZE_MODES = ("upstream", "exact")


def ndc_to_pixel_intrinsics(focal_length, principal_point, image_hw):
    """Return (focal_px, principal_px), each (..., 2) as (x, y), of PyTorch3D NDC intrinsics.

    Args:
        focal_length, principal_point: (..., 2) in NDC units of the shorter side (PyTorch3D >= 0.5).
        image_hw: (..., 2) (height, width) in pixels.
    """
    half_wh = image_hw.flip(-1) / 2.0
    half_short = half_wh.min(dim=-1, keepdim=True).values
    return focal_length * half_short, half_wh - principal_point * half_short


def pixel_to_ndc_intrinsics(focal_px, principal_px, image_hw):
    """Return (focal_length, principal_point) (..., 2) in PyTorch3D NDC of pixel intrinsics (..., 2)."""
    half_wh = image_hw.flip(-1) / 2.0
    half_short = half_wh.min(dim=-1, keepdim=True).values
    return focal_px / half_short, (half_wh - principal_px) / half_short


def foreground_box(mask, threshold=0.4, threshold_step=0.05):
    """Return the tight box (x0, y0, width, height), a long tensor (4,), of mask > threshold.

    As implicitron: while at most one pixel passes, the threshold drops by threshold_step (an empty
    mask ends with the whole image). The box's far edges are exclusive: x0 + width is one past the
    last foreground column. ValueError for a mask of fewer than 2 pixels.

    Args:
        mask: (1, H, W) or (H, W) foreground probability in [0, 1].
    """
    mask = mask.reshape(mask.shape[-2:])
    if mask.numel() < 2:  # the loop below ends once two pixels pass, which one pixel never does
        raise ValueError(f"the mask is {mask.shape[0]}x{mask.shape[1]} pixels; a foreground box needs at least 2")
    selected = torch.zeros_like(mask, dtype=torch.bool)
    while selected.sum() <= 1:
        selected = mask > threshold
        threshold -= threshold_step
    columns = torch.nonzero(selected.any(dim=0))[:, 0]
    rows = torch.nonzero(selected.any(dim=1))[:, 0]
    x0, x1 = columns[0], columns[-1] + 1
    y0, y1 = rows[0], rows[-1] + 1
    return torch.stack([x0, y0, x1 - x0, y1 - y0])


def crop_box(box_xywh, image_hw, context=0.3):
    """Return the crop box (x0, y0, x1, y1), a long tensor (4,) with exclusive x1, y1, inside the image.

    The box grows by context × its width and height (half on each side), keeps at least 2 pixels a
    side, is clamped to the image of size image_hw = (H, W) and rounded (half to even), computed in
    float32 in implicitron's order so that the rounding matches it.
    """
    box = box_xywh.to(torch.float32).clone()
    box[0] -= box[2] * context / 2
    box[1] -= box[3] * context / 2
    box[2] += box[2] * context
    box[3] += box[3] * context
    if (box[2:] <= 1.0).any():
        raise ValueError(f"the foreground box {box_xywh.tolist()} contains no pixels")
    box[2:] = box[2:].clamp(min=2.0)
    box[2:] += box[:2]
    height, width = image_hw
    box[0::2] = box[0::2].clamp(0, width)
    box[1::2] = box[1::2].clamp(0, height)
    return box.round().long()


def crop(image, box):
    """Return image (..., H, W) cut to box (x0, y0, x1, y1) (exclusive far edges)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return image[..., y0:y1, x0:x1]


def resize_and_pad(image, out_hw, mode="bilinear"):
    """Return (resized (C, H, W), scale, content_hw, valid (1, H, W)): image (C, h, w) fit into out_hw.

    As implicitron: one scale = min(H / h, W / w) for both axes, torch's interpolate with
    recompute_scale_factor=True (so the content is floor(h·scale) × floor(w·scale), which float
    rounding can make one pixel short of H or W), placed top-left, zeros elsewhere. valid is 1 on
    the content. The content's true per-axis scales are content_hw / (h, w).
    """
    height, width = out_hw
    scale = min(height / image.shape[-2], width / image.shape[-1])
    align = False if mode == "bilinear" else None
    resized = F.interpolate(image[None], scale_factor=scale, mode=mode, align_corners=align,
                            recompute_scale_factor=True)[0]
    content_h, content_w = resized.shape[-2:]
    out = image.new_zeros(image.shape[0], height, width)
    out[:, :content_h, :content_w] = resized
    valid = image.new_zeros(1, height, width)
    valid[:, :content_h, :content_w] = 1.0
    return out, scale, (content_h, content_w), valid


def camera_scales(scale, crop_hw, content_hw, resize_mode="upstream"):
    """Return the (x, y) scale (2,) that maps crop pixels to output pixels in the camera.

    "upstream" uses the nominal scale on both axes, as implicitron; the image itself is scaled by
    content/crop per axis, so projections drift by up to a pixel at the far edge of the shorter
    side. "exact" uses content/crop per axis, so projections match the resized image exactly.
    """
    check_choice("resize_mode", resize_mode, RESIZE_MODES)
    if resize_mode == "upstream":
        return torch.tensor([scale, scale], dtype=torch.float64)
    return torch.tensor([content_hw[1] / crop_hw[1], content_hw[0] / crop_hw[0]], dtype=torch.float64)


def cropped_cameras(cameras, boxes, scales, out_hw):
    """Return cameras (N) of the cropped and resized images, in PyTorch3D NDC for out_hw.

    Args:
        cameras: (N) cameras in NDC of their original image_size.
        boxes: (N, 4) crop boxes (x0, y0, x1, y1) in original pixels.
        scales: (N, 2) (x, y) scales from crop pixels to output pixels.
        out_hw: (H, W) of the output images.
    """
    dtype = cameras.dtype
    focal_px, principal_px = ndc_to_pixel_intrinsics(cameras.focal_length, cameras.principal_point,
                                                     cameras.image_size)
    scales = scales.to(dtype=dtype, device=cameras.device)
    principal_px = (principal_px - boxes[:, :2].to(dtype=dtype, device=cameras.device)) * scales
    focal_px = focal_px * scales
    out_size = torch.tensor([out_hw], dtype=dtype, device=cameras.device).expand(len(cameras), 2)
    focal_length, principal_point = pixel_to_ndc_intrinsics(focal_px, principal_px, out_size)
    return PerspectiveCameras(R=cameras.R, T=cameras.T, focal_length=focal_length,
                              principal_point=principal_point, image_size=out_size.clone())


def crop_and_resize(image, mask, out_hw, context=0.3, threshold=0.4, resize_mode="upstream"):
    """Return a frame cut around its foreground and resized, as implicitron: {image, mask, valid, box, scale}.

    image (3, S, S) and mask (1, S, S) in [0, 1] (bilinear and nearest resizing; "exact" resizes the
    mask nearest-exact), valid (1, S, S) the resized content, box (4,) the crop (x0, y0, x1, y1) in
    original pixels, scale (2,) the camera's (x, y) scale from crop to output pixels. A mask of ones
    crops nothing. ValueError if the mask's box holds no pixels.

    Args:
        image: (3, H, W) in [0, 1]; mask: (1, H, W) foreground probability; out_hw: (S, S).
    """
    box = crop_box(foreground_box(mask, threshold), image.shape[-2:], context)
    mask_mode = "nearest-exact" if resize_mode == "exact" else "nearest"
    mask, _, _, _ = resize_and_pad(crop(mask, box), out_hw, mode=mask_mode)
    image = crop(image, box)
    crop_hw = image.shape[-2:]
    image, scale, content_hw, valid = resize_and_pad(image, out_hw, mode="bilinear")
    return {"image": image, "mask": mask, "valid": valid, "box": box,
            "scale": camera_scales(scale, crop_hw, content_hw, resize_mode)}


def valid_region_box(valid):
    """Return upstream's 'bbox' (4,): the valid region's [min_y, min_x, max_y, max_x] in [-1, 1].

    As upstream: pixel indices v of the first and last valid row and column, mapped by
    (v - H//2) / (H//2) with H the output height for both axes, clipped to [-1, 1].
    """
    height = valid.shape[-2]
    rows = torch.nonzero(valid.reshape(valid.shape[-2:]).any(dim=1))[:, 0]
    columns = torch.nonzero(valid.reshape(valid.shape[-2:]).any(dim=0))[:, 0]
    corners = torch.stack([rows[0], columns[0], rows[-1], columns[-1]]).float()
    return ((corners - height // 2) / (height // 2)).clip(-1.0, 1.0)
