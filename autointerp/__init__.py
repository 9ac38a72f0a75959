"""autointerp: explain and score the latents of sparse dictionaries (SAEs, transcoders) at scale."""

__version__ = "0.1.0"
