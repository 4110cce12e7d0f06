"""Decoding: autoregressive (baseline), early exit, and self-speculative. See `generate`."""
from layerskip.decoding.api import generate, prepare
from layerskip.decoding.config import STRATEGIES, DecodeConfig, LayerSkipWarning, ResolvedConfig
from layerskip.decoding.result import GenerationResult, GenerationStats

__all__ = ["STRATEGIES", "DecodeConfig", "GenerationResult", "GenerationStats", "LayerSkipWarning",
           "ResolvedConfig", "generate", "prepare"]
