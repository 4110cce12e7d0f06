"""Decoding: autoregressive (baseline), early exit, and self-speculative. See `generate`."""
from layerskip.decoding.api import STRATEGIES, generate
from layerskip.decoding.result import GenerationResult, GenerationStats

__all__ = ["STRATEGIES", "GenerationResult", "GenerationStats", "generate"]
