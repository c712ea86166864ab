"""Random draws from one generator, or from one generator per scene of a batch of scenes.

A multi-scene distillation (sparsefusion/multi_scene.py) stacks the rows of G scenes (their rays, their
latents) into one tensor, scene g owning the g-th of G equal blocks of rows. Each block must hold exactly
the numbers a run of that scene alone draws, so each block is drawn at its own shape from its scene's
generator, and the blocks are concatenated.
"""

import torch


def is_grouped(generator):
    """Return whether generator is a sequence of generators (one per block of rows) rather than one or None."""
    return isinstance(generator, (list, tuple))


def draw(sample, shape, generator=None, **options):
    """Return sample(shape, generator=..., **options), e.g. with sample = torch.rand, shape (B, ...).

    generator: None (the global generator), a torch.Generator, or a sequence of G generators: then
    B = G·b and rows g·b … (g+1)·b − 1 are sample((b, ...), generator=generator[g]).
    """
    if not is_grouped(generator):
        return sample(shape, generator=generator, **options)
    groups = len(generator)
    if shape[0] % groups:
        raise ValueError(f"{shape[0]} rows do not split into {groups} equal groups")
    block = (shape[0] // groups, *shape[1:])
    return torch.cat([sample(block, generator=each, **options) for each in generator])
