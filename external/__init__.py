"""Building blocks from other projects, re-implemented with checkpoint-compatible names."""
