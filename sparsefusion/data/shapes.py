"""Procedural objects for the synthetic dataset: unions of textured solids, and rays traced into them.

A primitive is an ellipsoid, a capped elliptic cylinder or a box in its own local frame; its ray
intersection is solved in closed form there (a quadratic for the curved surfaces, slabs for the
box). An object is a union of primitives whose proportions and colours a category's builder draws
from a generator: a 'hydrant' is a striped cylinder with a dome, a flange and nozzles, a
'teddybear' ellipsoids for body, head, ears, arms, legs and snout, and so on.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from sparsefusion.errors import UserError

HIT_EPS = 1e-6  # smallest ray length that counts as a hit (the cameras are outside every primitive)


# ---------------------------------------------------------------------------------------------
# Primitives and their ray intersections (in each primitive's local frame)
# ---------------------------------------------------------------------------------------------

@dataclass
class Primitive:
    """A solid in the object's canonical frame (y up); local coordinates are (x - center) @ axes."""

    kind: str                  # "ellipsoid" | "cylinder" (along local y) | "box"
    center: torch.Tensor       # (3,) position in the canonical frame
    axes: torch.Tensor         # (3, 3) columns: the local x, y, z axes in canonical coordinates
    size: torch.Tensor         # (3,) ellipsoid radii | cylinder (radius x, half height, radius z) | box half extents
    color: torch.Tensor        # (3,) albedo in [0, 1]
    pattern: str = "solid"     # "solid" | "stripes" | "checker" | "spots"
    color2: Optional[torch.Tensor] = None  # (3,) the pattern's second albedo
    frequency: float = 4.0     # pattern cycles per unit length


def safe_divisor(x):
    """Return x with entries of magnitude below 1e-12 pushed to ±1e-12, for divisions by ray directions."""
    return torch.where(x.abs() < 1e-12, torch.full_like(x, 1e-12).copysign(x), x)


def _nearest_root(a, b, c):
    """Return the smallest root > HIT_EPS of a t² + b t + c (inf where none), for (R,) coefficients."""
    disc = b * b - 4 * a * c
    root = disc.clamp(min=0).sqrt()
    near, far = (-b - root) / (2 * a), (-b + root) / (2 * a)
    t = torch.where(near > HIT_EPS, near, far)
    return torch.where((disc >= 0) & (t > HIT_EPS), t, torch.full_like(t, math.inf))


def ellipsoid_hit(o, d, size):
    """Return (t (R,), local normal (R, 3)) of local rays o + t d (R, 3) with an axis-aligned ellipsoid."""
    p, q = o / size, d / size
    t = _nearest_root((q * q).sum(-1), 2 * (p * q).sum(-1), (p * p).sum(-1) - 1)
    point = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    return t, point / size ** 2


def cylinder_hit(o, d, size):
    """Return (t (R,), local normal (R, 3)) of local rays with a capped elliptic cylinder along y."""
    radius = size[[0, 2]]
    half_height = size[1]
    p, q = o[:, [0, 2]] / radius, d[:, [0, 2]] / radius
    side = _nearest_root((q * q).sum(-1).clamp(min=1e-12), 2 * (p * q).sum(-1), (p * p).sum(-1) - 1)
    # the quadratic's nearest root may lie beyond a cap while the far one is on the side; the caps catch those rays
    side_y = o[:, 1] + torch.nan_to_num(side, posinf=0.0) * d[:, 1]
    candidates = [torch.where(side_y.abs() <= half_height, side, torch.full_like(side, math.inf))]
    for level in (half_height, -half_height):
        t = (level - o[:, 1]) / safe_divisor(d[:, 1])
        xz = (o[:, [0, 2]] + t[:, None] * d[:, [0, 2]]) / radius
        inside = ((xz * xz).sum(-1) <= 1) & (t > HIT_EPS)
        candidates.append(torch.where(inside, t, torch.full_like(t, math.inf)))
    t = torch.stack(candidates).min(dim=0).values
    point = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    on_cap = point[:, 1].abs() >= half_height * (1 - 1e-4)
    side_normal = torch.stack([point[:, 0] / radius[0] ** 2, torch.zeros_like(t), point[:, 2] / radius[1] ** 2], -1)
    cap_normal = torch.zeros_like(point)
    cap_normal[:, 1] = torch.sign(point[:, 1])
    return t, torch.where(on_cap[:, None], cap_normal, side_normal)


def box_hit(o, d, size):
    """Return (t (R,), local normal (R, 3)) of local rays with an axis-aligned box of half extents size."""
    d_safe = safe_divisor(d)
    t1, t2 = (-size - o) / d_safe, (size - o) / d_safe
    t_enter, axis = torch.minimum(t1, t2).max(dim=-1)
    t_exit = torch.maximum(t1, t2).min(dim=-1).values
    hit = (t_exit >= t_enter) & (t_enter > HIT_EPS)
    normal = -F.one_hot(axis, 3).to(d.dtype) * torch.sign(d_safe)
    return torch.where(hit, t_enter, torch.full_like(t_enter, math.inf)), normal


HITS = {"ellipsoid": ellipsoid_hit, "cylinder": cylinder_hit, "box": box_hit}


def pattern_mask(pattern, local, frequency):
    """Return a bool (R,) choosing the second colour of a procedural pattern at local points (R, 3)."""
    phase = 2 * math.pi * frequency * local
    if pattern == "solid":
        return torch.zeros(local.shape[0], dtype=torch.bool, device=local.device)
    if pattern == "stripes":
        return torch.sin(phase[:, 1]) > 0
    if pattern == "checker":
        return torch.floor(frequency * local).sum(-1).remainder(2) > 0.5
    if pattern == "spots":
        return torch.sin(phase).prod(-1) > 0.25
    raise ValueError(f"pattern must be one of solid, stripes, checker, spots; got {pattern!r}")


def rays_near_sphere(o, d, center, radius):
    """Return the indices (K,) of rays o + t d (R, 3), t > 0, passing within radius of center (3,)."""
    along = ((center - o) * d).sum(-1) / (d * d).sum(-1)
    miss = o + along[:, None] * d - center
    return torch.nonzero(((miss * miss).sum(-1) <= radius * radius) & (along > 0))[:, 0]


def hit_object(primitives, o, d):
    """Return (t (R,), unit normal (R, 3), albedo (R, 3)) of canonical rays with the union of primitives.

    Each primitive only traces the rays that pass near it (within its bounding sphere).
    """
    t_best = torch.full(o.shape[:1], math.inf, dtype=o.dtype, device=o.device)
    normal_best = torch.zeros_like(o)
    albedo_best = torch.zeros_like(o)
    for prim in primitives:
        axes, center = prim.axes.to(o), prim.center.to(o)
        rows = rays_near_sphere(o, d, center, float(prim.size.norm()) * 1.001)  # |size| bounds all three kinds
        if rows.numel() == 0:
            continue
        o_local, d_local = (o[rows] - center) @ axes, d[rows] @ axes
        t, normal_local = HITS[prim.kind](o_local, d_local, prim.size.to(o))
        closer = t < t_best[rows]
        t, normal_local, o_local, d_local = t[closer], normal_local[closer], o_local[closer], d_local[closer]
        rows = rows[closer]
        local = o_local + t[:, None] * d_local
        second = pattern_mask(prim.pattern, local, prim.frequency)
        color2 = prim.color if prim.color2 is None else prim.color2
        t_best[rows] = t
        normal_best[rows] = normal_local @ axes.T
        albedo_best[rows] = torch.where(second[:, None], color2.to(o), prim.color.to(o))
    return t_best, F.normalize(normal_best, dim=-1), albedo_best


def inside_object(primitives, points, shrink=1e-3):
    """Return a bool (P,) marking canonical points (P, 3) strictly inside some primitive."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for prim in primitives:
        local = (points - prim.center) @ prim.axes / prim.size
        if prim.kind == "ellipsoid":
            inside |= (local ** 2).sum(-1) < 1 - shrink
        elif prim.kind == "cylinder":
            inside |= ((local[:, [0, 2]] ** 2).sum(-1) < 1 - shrink) & (local[:, 1].abs() < 1 - shrink)
        else:
            inside |= (local.abs() < 1 - shrink).all(-1)
    return inside


def surface_samples(prim, n, generator):
    """Return n points (n, 3) on a primitive's surface, in canonical coordinates."""
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    if prim.kind == "ellipsoid":
        local = F.normalize(torch.randn(n, 3, generator=generator, dtype=torch.float64), dim=-1)
    elif prim.kind == "cylinder":
        angle = 2 * math.pi * u[:, 0]
        on_cap = u[:, 2] < 0.3
        r = torch.where(on_cap, u[:, 1].sqrt(), torch.ones_like(u[:, 1]))
        y = torch.where(on_cap, torch.sign(u[:, 1] - 0.5), 2 * u[:, 1] - 1)
        local = torch.stack([r * torch.cos(angle), y, r * torch.sin(angle)], -1)
    else:
        face = torch.randint(0, 3, (n,), generator=generator)
        local = 2 * u - 1
        local[torch.arange(n), face] = torch.sign(local[torch.arange(n), face])
    return (local * prim.size) @ prim.axes.T + prim.center


def object_surface_points(primitives, n_per_primitive, generator):
    """Return points (P, 3) on the outer surface of the union of primitives (canonical coordinates)."""
    points = torch.cat([surface_samples(p, n_per_primitive, generator) for p in primitives])
    return points[~inside_object(primitives, points)]


# ---------------------------------------------------------------------------------------------
# Categories: random proportions and colours around a recognisable shape
# ---------------------------------------------------------------------------------------------

def rotation(axis, angle):
    """Return the (3, 3) rotation by angle (radians) about axis (3,), for column vectors (Rodrigues)."""
    k = F.normalize(torch.as_tensor(axis, dtype=torch.float64), dim=0)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


class _Builder:
    """Draws random proportions and colours from a generator and collects primitives."""

    def __init__(self, generator):
        self.generator = generator
        self.primitives = []

    def uniform(self, low, high):
        """Return a float drawn uniformly from [low, high)."""
        return low + (high - low) * float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def choice(self, options):
        """Return one of options, drawn uniformly."""
        return options[int(torch.randint(len(options), (), generator=self.generator))]

    def color(self, base, jitter=0.08):
        """Return the colour base (3,) with each channel jittered by up to ±jitter, kept in [0.02, 0.98]."""
        noise = (torch.rand(3, generator=self.generator, dtype=torch.float64) - 0.5) * 2 * jitter
        return (torch.tensor(base, dtype=torch.float64) + noise).clamp(0.02, 0.98)

    def add(self, kind, center, size, color, axes=None, pattern="solid", color2=None, frequency=4.0):
        """Append a Primitive (see its fields); axes default to the canonical ones."""
        self.primitives.append(Primitive(
            kind=kind, center=torch.tensor(center, dtype=torch.float64),
            axes=torch.eye(3, dtype=torch.float64) if axes is None else axes,
            size=torch.tensor(size, dtype=torch.float64), color=color, pattern=pattern,
            color2=color2, frequency=frequency))


def build_hydrant(b):
    """Add a fire hydrant: a striped body, a flange, a dome with a nut, side and front nozzles."""
    body = b.color(b.choice([(0.8, 0.1, 0.1), (0.9, 0.75, 0.1), (0.1, 0.5, 0.2), (0.15, 0.3, 0.75)]))
    trim = b.color((0.85, 0.85, 0.8))
    r, h = b.uniform(0.25, 0.33), b.uniform(0.45, 0.6)
    b.add("cylinder", (0, 0, 0), (r, h, r), body, pattern="stripes", color2=body * 0.7, frequency=b.uniform(3, 6))
    b.add("cylinder", (0, -h, 0), (r * 1.3, 0.06, r * 1.3), trim)
    b.add("ellipsoid", (0, h, 0), (r * 1.05, r * 0.7, r * 1.05), body)
    b.add("cylinder", (0, h + r * 0.7, 0), (r * 0.25, 0.06, r * 0.25), trim)
    sideways = rotation((0, 0, 1), math.pi / 2)
    nozzle = b.uniform(0.08, 0.12)
    b.add("cylinder", (0, h * 0.35, 0), (nozzle, r + 0.12, nozzle), trim, axes=sideways)
    b.add("cylinder", (0, h * 0.2, r), (nozzle * 1.3, 0.08, nozzle * 1.3), trim, axes=rotation((1, 0, 0), math.pi / 2))


def build_teddybear(b):
    """Add a teddy bear: spotted body, head, ears, arms, legs and snout."""
    fur = b.color(b.choice([(0.55, 0.35, 0.18), (0.8, 0.65, 0.45), (0.9, 0.9, 0.85), (0.3, 0.2, 0.15)]))
    dark, light = fur * 0.6, (fur * 0.5 + 0.5).clamp(0, 1)
    body, head = b.uniform(0.3, 0.38), b.uniform(0.22, 0.28)
    b.add("ellipsoid", (0, -0.1, 0), (body, body * 1.2, body * 0.9), fur, pattern="spots", color2=dark,
          frequency=b.uniform(5, 8))
    b.add("ellipsoid", (0, body * 1.2 + head * 0.6, 0), (head, head * 0.95, head * 0.9), fur)
    for side in (-1, 1):
        b.add("ellipsoid", (side * head * 0.75, body * 1.2 + head * 1.35, 0), (0.09, 0.09, 0.05), dark)
        b.add("ellipsoid", (side * body * 0.95, 0.0, body * 0.2), (0.1, 0.22, 0.1), fur,
              axes=rotation((0, 0, 1), side * 0.6))
        b.add("ellipsoid", (side * body * 0.5, -body * 1.2, body * 0.5), (0.12, 0.12, 0.2), fur)
    b.add("ellipsoid", (0, body * 1.2 + head * 0.45, head * 0.85), (0.09, 0.07, 0.08), light)


def build_apple(b):
    """Add an apple: a squashed striped sphere, a stem and a leaf."""
    skin = b.color(b.choice([(0.75, 0.08, 0.08), (0.45, 0.75, 0.2), (0.9, 0.7, 0.15)]))
    r = b.uniform(0.4, 0.5)
    b.add("ellipsoid", (0, 0, 0), (r, r * b.uniform(0.8, 0.95), r), skin, pattern="stripes",
          color2=(skin * 0.8 + 0.1).clamp(0, 1), frequency=b.uniform(6, 10), axes=rotation((1, 0, 0), math.pi / 2))
    b.add("cylinder", (0, r * 0.9, 0), (0.025, 0.1, 0.025), b.color((0.35, 0.2, 0.1)))
    b.add("ellipsoid", (0.1, r * 0.95, 0), (0.12, 0.015, 0.06), b.color((0.2, 0.55, 0.15)),
          axes=rotation((0, 0, 1), 0.4))


def build_ball(b):
    """Add a ball: a two-colour checkered sphere."""
    b.add("ellipsoid", (0, 0, 0), (0.45,) * 3, b.color((0.92, 0.92, 0.9)), pattern="checker",
          color2=b.color(b.choice([(0.1, 0.1, 0.1), (0.8, 0.1, 0.1), (0.1, 0.2, 0.8)])), frequency=b.uniform(2.5, 4))


def build_vase(b):
    """Add a vase: a striped belly, a neck, a lip and a foot."""
    glaze = b.color(b.choice([(0.2, 0.35, 0.7), (0.7, 0.5, 0.3), (0.3, 0.6, 0.55)]))
    r = b.uniform(0.28, 0.36)
    b.add("ellipsoid", (0, 0, 0), (r, r * 1.3, r), glaze, pattern="stripes", color2=(glaze + 0.3).clamp(0, 1),
          frequency=b.uniform(3, 5))
    b.add("cylinder", (0, r * 1.3 + 0.12, 0), (r * 0.4, 0.2, r * 0.4), glaze)
    b.add("cylinder", (0, r * 1.3 + 0.32, 0), (r * 0.55, 0.03, r * 0.55), glaze * 0.8)
    b.add("cylinder", (0, -r * 1.2, 0), (r * 0.6, 0.05, r * 0.6), glaze * 0.8)


def build_bench(b):
    """Add a bench: a slatted seat, a tilted backrest and four legs."""
    wood = b.color(b.choice([(0.55, 0.35, 0.2), (0.7, 0.55, 0.35), (0.3, 0.3, 0.32)]))
    width, depth = b.uniform(0.7, 0.9), b.uniform(0.22, 0.3)
    b.add("box", (0, 0, 0), (width, 0.035, depth), wood, pattern="stripes", color2=wood * 0.8,
          frequency=b.uniform(8, 12), axes=rotation((1, 0, 0), math.pi / 2))
    b.add("box", (0, 0.3, -depth), (width, 0.15, 0.03), wood, axes=rotation((1, 0, 0), -0.2))
    for x in (-width * 0.85, width * 0.85):
        for z in (-depth * 0.8, depth * 0.8):
            b.add("box", (x, -0.22, z), (0.04, 0.2, 0.04), wood * 0.6)


def build_suitcase(b):
    """Add a suitcase: a checkered shell, a telescopic handle and two wheels."""
    shell = b.color(b.choice([(0.15, 0.15, 0.18), (0.6, 0.1, 0.15), (0.2, 0.4, 0.6), (0.8, 0.6, 0.2)]))
    w, h, d = b.uniform(0.35, 0.45), b.uniform(0.45, 0.55), b.uniform(0.15, 0.2)
    b.add("box", (0, 0, 0), (w, h, d), shell, pattern="checker", color2=shell * 0.75, frequency=b.uniform(3, 5))
    metal = b.color((0.7, 0.7, 0.72))
    for x in (-w * 0.4, w * 0.4):
        b.add("box", (x, h + 0.1, 0), (0.02, 0.1, 0.02), metal)
        b.add("cylinder", (x * 2.0, -h - 0.04, d * 0.6), (0.04, 0.02, 0.04), b.color((0.1, 0.1, 0.1)),
              axes=rotation((0, 0, 1), math.pi / 2))
    b.add("box", (0, h + 0.2, 0), (w * 0.45, 0.02, 0.03), metal)


def build_cake(b):
    """Add a cake: a spotted base tier, a top tier, candles and flames."""
    icing = b.color(b.choice([(0.95, 0.85, 0.9), (0.95, 0.95, 0.85), (0.5, 0.3, 0.2)]))
    r = b.uniform(0.4, 0.5)
    b.add("cylinder", (0, 0, 0), (r, 0.15, r), icing, pattern="spots", color2=b.color((0.8, 0.2, 0.4)),
          frequency=b.uniform(6, 9))
    b.add("cylinder", (0, 0.25, 0), (r * 0.65, 0.1, r * 0.65), icing)
    for k in range(int(b.uniform(3, 6))):
        angle = 2 * math.pi * k / 5 + b.uniform(0, 0.5)
        x, z = r * 0.35 * math.cos(angle), r * 0.35 * math.sin(angle)
        b.add("cylinder", (x, 0.43, z), (0.02, 0.08, 0.02), b.color((0.3, 0.5, 0.9)))
        b.add("ellipsoid", (x, 0.54, z), (0.02, 0.035, 0.02), b.color((1.0, 0.75, 0.2)))


CATEGORY_BUILDERS = {
    "hydrant": build_hydrant, "teddybear": build_teddybear, "apple": build_apple, "ball": build_ball,
    "vase": build_vase, "bench": build_bench, "suitcase": build_suitcase, "cake": build_cake,
}
SYNTHETIC_CATEGORIES = tuple(CATEGORY_BUILDERS)


@dataclass
class SyntheticObject:
    """An object standing on a floor, in its canonical frame (y up, bounding box centred at 0)."""

    primitives: List[Primitive]
    floor_y: float                # height of the floor (the object's lowest point)
    radius: float                 # radius of a sphere about the origin holding the object
    floor_colors: torch.Tensor    # (2, 3) the floor's checker albedos
    backdrop_colors: torch.Tensor  # (2, 3) the backdrop's bottom and top colours
    light: torch.Tensor           # (3,) unit direction towards the light


def make_object(category, generator):
    """Return a random SyntheticObject of a category, centred on its bounding box and scaled as CO3D's.

    CO3D centres each sequence's point cloud and scales it to unit standard deviation (averaged
    over the axes); the object is scaled so that its surface points do the same, which puts the
    cameras some 7-15 units away, as in CO3D.
    """
    if category not in CATEGORY_BUILDERS:
        raise UserError(f"unknown synthetic category {category!r}; choose from {list(SYNTHETIC_CATEGORIES)}")
    builder = _Builder(generator)
    CATEGORY_BUILDERS[category](builder)
    points = object_surface_points(builder.primitives, 400, generator)
    centre = (points.min(dim=0).values + points.max(dim=0).values) / 2
    scale = 1.0 / float((points - centre).std(dim=0).mean())
    for prim in builder.primitives:
        prim.center = (prim.center - centre) * scale
        prim.size = prim.size * scale
        prim.frequency = prim.frequency / scale
    points = (points - centre) * scale
    floor = builder.color((0.55, 0.5, 0.45), jitter=0.2)
    wall = builder.color((0.6, 0.65, 0.7), jitter=0.2)
    return SyntheticObject(
        primitives=builder.primitives,
        floor_y=float(points[:, 1].min()),
        radius=float(points.norm(dim=-1).max()),
        floor_colors=torch.stack([floor, floor * 0.8]),
        backdrop_colors=torch.stack([wall * 0.7, (wall + 0.25).clamp(0, 1)]),
        light=F.normalize(torch.tensor([builder.uniform(-0.6, 0.6), 1.0, builder.uniform(-0.6, 0.6)],
                                       dtype=torch.float64), dim=0),
    )
