"""Pixel-by-pixel samplers for autoregressive image models: fastgen.sample
(cached or naive) and the teacher-forced logits of the cached path."""
from fastgen.sampling.api import cached_logits, sample
from fastgen.sampling.common import CausalityError
from fastgen.sampling.tracing import CompileError

__all__ = ["sample", "cached_logits", "CompileError", "CausalityError"]
