"""Volume rendering of a density/albedo field, as upstream's renderer_df `run` with cuda_ray off.

Per ray: near/far from the scene box (min_near 0.1), `num_steps` stratified depths (jittered when
perturb), `upsample_steps` more drawn from the coarse weights by inverse-CDF sampling (NeRF, Mildenhall
et al. 2020, §5.2), then alpha compositing over the merged, sorted samples (NeRF eq. 3):

    α_i = 1 − exp(−σ_i δ_i),   w_i = α_i ∏_{j<i} (1 − α_j + 1e−15),   C = Σ w_i c_i + (1 − Σ w_i) c_bg.

δ_i is the gap to the next sample; the last sample gets (far − near) / num_steps. The field is a
callable mapping points (P, 3) to (density (P,), albedo (P, 3)). Compositing runs in float32 whatever
precision the field ran in, so autocast stays finite.
"""

from dataclasses import dataclass

import torch

from sparsefusion.generators import draw, is_grouped


@dataclass
class NeRFRenderConfig:
    num_steps: int = 64         # stratified samples per ray (upstream opt.num_steps)
    upsample_steps: int = 64    # importance samples per ray, 0 for none (upstream opt.upsample_steps)
    min_near: float = 0.1       # no sample nearer than this to the ray origin
    max_ray_batch: int = 4096   # rays per chunk when rendering staged


def near_far_from_aabb(rays_o, rays_d, aabb, min_near):
    """Return (near, far) (R,) where rays (R, 3) enter and leave the box aabb (6,) = (min xyz, max xyz).

    Slab method as torch-ngp's near_far_from_aabb; near is at least min_near. Rays that miss the box (or
    meet it only behind min_near) get near = far = min_near, so they collect no density.
    """
    inv_d = 1.0 / rays_d
    t_lo = (aabb[:3] - rays_o) * inv_d
    t_hi = (aabb[3:] - rays_o) * inv_d
    # 0·inf (origin on a face plane, direction parallel to it) counts as inside that slab
    enter = torch.minimum(t_lo, t_hi).nan_to_num(nan=-torch.inf, neginf=-torch.inf, posinf=torch.inf).amax(dim=-1)
    leave = torch.maximum(t_lo, t_hi).nan_to_num(nan=torch.inf, neginf=-torch.inf, posinf=torch.inf).amin(dim=-1)
    near = enter.clamp_min(min_near)
    hit = leave >= near
    near = torch.where(hit, near, torch.full_like(near, min_near))
    far = torch.where(hit, leave, near)
    return near, far


def stratified_depths(near, far, num_steps, perturb, generator=None):
    """Return (depths (R, T), sample spacing (R, 1)): T evenly spaced depths from near to far (R,).

    With perturb each depth moves by a uniform offset in ±spacing/2, spacing = (far − near) / T.
    """
    steps = torch.linspace(0.0, 1.0, num_steps, device=near.device, dtype=near.dtype)
    near, far = near.unsqueeze(-1), far.unsqueeze(-1)
    depths = near + (far - near) * steps  # (R, T)
    spacing = (far - near) / num_steps
    if perturb:
        noise = draw(torch.rand, depths.shape, generator, device=depths.device, dtype=depths.dtype)
        depths = depths + (noise - 0.5) * spacing
    return depths, spacing


def points_at_depths(rays_o, rays_d, depths, aabb):
    """Return points (R, T, 3) at depths (R, T) along rays (R, 3), clipped to the box aabb (6,)."""
    points = rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * depths.unsqueeze(-1)
    return torch.minimum(torch.maximum(points, aabb[:3]), aabb[3:])


def alphas_from_density(density, deltas):
    """Return opacities 1 − exp(−σ δ) (R, T) of density σ (R, T) over intervals δ (R, T)."""
    return 1 - torch.exp(-deltas * density)


class _PositiveCumprod(torch.autograd.Function):
    """torch.cumprod over the last dimension of positive factors, with PyTorch's gradient for inputs without zeros.

    PyTorch's cumprod backward first asks the device whether the input holds a zero, a host synchronisation
    that a CUDA graph cannot hold (sparsefusion/nerf_steps.py); the transmittance's factors 1 − α + 1e−15
    never are zero, so its no-zero branch, computed here unconditionally, is the gradient it would take.
    """

    @staticmethod
    def forward(ctx, factors):
        products = torch.cumprod(factors, dim=-1)
        ctx.save_for_backward(factors, products)
        return products

    @staticmethod
    def backward(ctx, grad):
        factors, products = ctx.saved_tensors
        return (products * grad).flip(-1).cumsum(-1).flip(-1) / factors


def weights_from_alphas(alphas):
    """Return compositing weights α_i ∏_{j<i} (1 − α_j + 1e−15) (R, T) of opacities (R, T)."""
    transmittance = _PositiveCumprod.apply(1 - alphas + 1e-15)
    transmittance = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], dim=-1)
    return alphas * transmittance


def deltas_from_depths(depths, last_delta):
    """Return the gaps (R, T) from each sorted depth (R, T) to the next, last_delta (R, 1) for the last."""
    return torch.cat([depths[..., 1:] - depths[..., :-1], last_delta.expand_as(depths[..., :1])], dim=-1)


def weights_from_density(density, depths, last_delta):
    """Return compositing weights (R, T) of density (R, T) at sorted depths (R, T) (NeRF eq. 3)."""
    return weights_from_alphas(alphas_from_density(density, deltas_from_depths(depths, last_delta)))


def sample_pdf(bins, weights, n_samples, deterministic=False, generator=None):
    """Return n_samples depths (R, n) drawn from the piecewise-constant density weights (R, B−1) over bins (R, B).

    Inverse transform sampling as in NeRF's sample_pdf (weights + 1e−5 so empty rays sample uniformly);
    deterministic uses the stratified quantiles (i + ½)/n instead of uniform draws.
    """
    weights = weights + 1e-5
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(pdf, dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], dim=-1)  # (R, B)
    shape = (*cdf.shape[:-1], n_samples)
    if deterministic:
        u = torch.linspace(0.5 / n_samples, 1 - 0.5 / n_samples, n_samples, device=cdf.device, dtype=cdf.dtype)
        u = u.expand(shape).contiguous()
    else:
        u = draw(torch.rand, shape, generator, device=cdf.device, dtype=cdf.dtype)
    upper = torch.searchsorted(cdf, u, right=True)
    below = (upper - 1).clamp_min(0)
    above = upper.clamp_max(cdf.shape[-1] - 1)
    cdf_below, cdf_above = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_below, bin_above = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_above - cdf_below
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return bin_below + (u - cdf_below) / denom * (bin_above - bin_below)


def composite(weights, colors, depths, near, far, bg_color):
    """Return (image (R, 3), depth (R,), weights_sum (R,)) from weights (R, T) and colours (R, T, 3).

    depth is upstream's: the weighted mean of (depth − near) / (far − near) clamped to [0, 1] (0 on rays
    that miss the box, where upstream gives NaN). bg_color fills the transparent rest: a number or a
    tensor broadcastable to (R, 3).
    """
    weights_sum = weights.sum(dim=-1)
    span = (far - near).unsqueeze(-1)
    unit_depths = ((depths - near.unsqueeze(-1)) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0, 1)
    depth = (weights * unit_depths).sum(dim=-1)
    image = (weights.unsqueeze(-1) * colors).sum(dim=-2)
    image = image + (1 - weights_sum).unsqueeze(-1) * bg_color
    return image, depth, weights_sum


def _sorted_merge(depths, extra_depths, *values):
    """Return depths and per-sample values concatenated with the extra samples' and sorted by depth."""
    merged, order = torch.sort(torch.cat([depths, extra_depths], dim=-1), dim=-1)
    gathered = []
    for coarse, fine in values:
        both = torch.cat([coarse, fine], dim=1)
        index = order.view(*order.shape, *([1] * (both.dim() - 2))).expand_as(both)
        gathered.append(torch.gather(both, 1, index))
    return (merged, *gathered)


def render_rays(field, rays_o, rays_d, aabb, config, perturb=False, bg_color=None, deterministic_pdf=False,
                generator=None):
    """Return {'image' (R, 3), 'depth' (R,), 'weights_sum' (R,), 'mask' (R,)} of rays (R, 3) through a field.

    Steps as upstream's renderer: (1) near/far from the box; (2) stratified samples, densities and
    albedo; (3) coarse weights (no gradient) and importance samples from them; (4) their densities and
    albedo, merged and sorted; (5) compositing. bg_color None means white (1), as upstream.
    """
    n_rays = rays_o.shape[0]
    near, far = near_far_from_aabb(rays_o, rays_d, aabb, config.min_near)
    depths, spacing = stratified_depths(near, far, config.num_steps, perturb, generator)
    density, albedo = field(points_at_depths(rays_o, rays_d, depths, aabb).reshape(-1, 3))
    density, albedo = density.float().view(n_rays, -1), albedo.float().view(n_rays, -1, 3)

    if config.upsample_steps > 0:
        with torch.no_grad():
            deltas = deltas_from_depths(depths, spacing)
            coarse_weights = weights_from_alphas(alphas_from_density(density, deltas))
            mids = depths[..., :-1] + 0.5 * deltas[..., :-1]
            fine_depths = sample_pdf(mids, coarse_weights[..., 1:-1], config.upsample_steps, deterministic_pdf,
                                     generator)
        fine_density, fine_albedo = field(points_at_depths(rays_o, rays_d, fine_depths, aabb).reshape(-1, 3))
        fine_density, fine_albedo = fine_density.float().view(n_rays, -1), fine_albedo.float().view(n_rays, -1, 3)
        depths, density, albedo = _sorted_merge(depths, fine_depths, (density, fine_density), (albedo, fine_albedo))

    weights = weights_from_density(density, depths, spacing)
    image, depth, weights_sum = composite(weights, albedo, depths, near, far, 1.0 if bg_color is None else bg_color)
    return {"image": image, "depth": depth, "weights_sum": weights_sum, "mask": near < far}


def render(field, rays_o, rays_d, aabb, config=None, perturb=False, bg_color=None, deterministic_pdf=False,
           max_ray_batch=None, generator=None):
    """Return {'image' (..., 3), 'depth' (...), 'weights_sum' (...), 'mask' (...)} for rays (..., 3).

    Rays are rendered max_ray_batch at a time when given (all at once when None); gradients flow
    through every chunk. bg_color may be a number or a tensor broadcastable to (..., 3). generator: one,
    or a list of G, one per equal block of the rays (several scenes' rays, unchunked: each block's
    draws are then those of its rays rendered alone; sparsefusion.generators).
    """
    config = NeRFRenderConfig() if config is None else config
    if is_grouped(generator) and max_ray_batch is not None:
        raise ValueError("rays drawn from one generator per block of rays cannot be rendered in chunks")
    prefix = rays_o.shape[:-1]
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    if torch.is_tensor(bg_color) and bg_color.dim() > 1:
        bg_color = bg_color.expand(*prefix, 3).reshape(-1, 3)
    chunk = rays_o.shape[0] if max_ray_batch is None else max_ray_batch
    pieces = []
    for start in range(0, max(rays_o.shape[0], 1), max(chunk, 1)):
        end = start + chunk
        bg = bg_color[start:end] if torch.is_tensor(bg_color) and bg_color.dim() > 1 else bg_color
        pieces.append(render_rays(field, rays_o[start:end], rays_d[start:end], aabb, config, perturb, bg,
                                  deterministic_pdf, generator))
    results = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
    return {key: value.reshape(*prefix, *value.shape[1:]) for key, value in results.items()}
