"""Cameras re-expressed relative to a query camera, as upstream's RelativeCameraLoader.

The models never see absolute world coordinates: every pose is composed with the inverse of an
"identity" pose built from the query camera, g_id^-1 · g_i. With center_at_origin=False (upstream's
default) the identity pose keeps only the query's rotation, so the query camera gets R = I and keeps
its translation T; with center_at_origin=True the query camera becomes R = I, T = 0.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from sparsefusion.cameras import PerspectiveCameras


def relative_cameras(cameras, query_index, center_at_origin=False):
    """Return the cameras (N) re-expressed in the frame of cameras[query_index].

    With row vectors, a world point X maps to the identity frame as X' = X R_q + T_id (T_id = T_q
    or 0), so camera i becomes R_i' = R_q^T R_i and T_i' = T_i - T_id R_i'. Every pair's relative
    pose is unchanged.
    """
    rotation_q = cameras.R[query_index].reshape(3, 3)
    translation_id = cameras.T[query_index].reshape(1, 3) if center_at_origin else cameras.T.new_zeros(1, 3)
    R = rotation_q.T @ cameras.R
    T = cameras.T - (translation_id @ R)[:, 0]
    return PerspectiveCameras(R=R, T=T, focal_length=cameras.focal_length,
                              principal_point=cameras.principal_point, image_size=cameras.image_size)


@dataclass
class QueryContext:
    """A query view and its context views, cameras relative to the query."""

    query_cameras: PerspectiveCameras    # (1) the query camera
    context_cameras: PerspectiveCameras  # (V) the context cameras
    query_index: torch.Tensor            # (1,) index of the query view in the scene
    context_index: torch.Tensor          # (V,) indices of the context views in the scene
    query_images: Optional[torch.Tensor] = None    # (1, 3, H, W)
    context_images: Optional[torch.Tensor] = None  # (V, 3, H, W)
    query_masks: Optional[torch.Tensor] = None     # (1, 1, H, W)
    context_masks: Optional[torch.Tensor] = None   # (V, 1, H, W)


def sample_query_and_context(cameras, images=None, masks=None, context_size=3, query_index=None,
                             context_index=None, rand_query=True, relative=True, center_at_origin=False,
                             generator=None):
    """Return a QueryContext drawn from a scene's N cameras, as upstream's RelativeCameraLoader.forward.

    Draws, in order and only where an index is not given: the query (first of a random permutation,
    or view 0 when rand_query is False), then the context (first context_size of another permutation).
    As upstream, the context may contain the query view.
    """
    n_views = len(cameras)
    if query_index is None:
        query_index = torch.randperm(n_views, generator=generator)[:1] if rand_query else torch.tensor([0])
    if context_index is None:
        context_index = torch.randperm(n_views, generator=generator)[:context_size]
    query_index = torch.as_tensor(query_index).reshape(-1)
    context_index = torch.as_tensor(context_index).reshape(-1)
    frame = relative_cameras(cameras, query_index, center_at_origin) if relative else cameras

    def pick(tensor, index):
        return None if tensor is None else tensor[index.to(tensor.device)]

    return QueryContext(
        query_cameras=frame[query_index], context_cameras=frame[context_index],
        query_index=query_index, context_index=context_index,
        query_images=pick(images, query_index), context_images=pick(images, context_index),
        query_masks=pick(masks, query_index), context_masks=pick(masks, context_index),
    )
