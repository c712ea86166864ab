"""Building blocks from other projects, re-implemented with checkpoint-compatible names: sparsefusion.external.

In a checkout their code lives in the repository's top-level external/ folder, as upstream and the design
card lay it out; this package points there. setup.py installs that folder as this package, so no generic
top-level `external` lands in site-packages.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "external")]
