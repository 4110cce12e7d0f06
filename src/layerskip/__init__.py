"""layerskip: LayerSkip (Elhoushi et al., ACL 2024, arXiv 2404.16710) for transformers models.

    import layerskip
    model, tokenizer = layerskip.load()            # the built-in default model, or a path / hub id
    engine = layerskip.prepare(model, tune=True)   # optional: reuse across calls, CPU kernels timed once
    ids = tokenizer("def fib(n):").input_ids
    out = layerskip.generate(engine, ids, strategy="self_speculative", exit_layer=4,
                             num_speculations=6, tokenizer=tokenizer)
    print(out.text, out.stats.tokens_per_second, out.stats.acceptance_rate)
"""
from layerskip.decoding import STRATEGIES, DecodeConfig, GenerationResult, GenerationStats, generate, prepare
from layerskip.errors import LayerSkipError
from layerskip.models import SUPPORTED_ARCHITECTURES, load

__version__ = "0.1.0"
__all__ = ["STRATEGIES", "SUPPORTED_ARCHITECTURES", "DecodeConfig", "GenerationResult", "GenerationStats",
           "LayerSkipError", "generate", "load", "prepare"]
