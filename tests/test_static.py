"""The static-shape path (decoding/static.py) against the eager path, the slow reference: same tokens, every
architecture, every strategy, batches with rows ending in different rounds; traced as one graph that never
recompiles; compiled once with inductor (the one compiled model of the suite); CUDA graphs where a GPU exists."""
import pytest
import torch

import layerskip
from layerskip.decoding import static
from layerskip.decoding.api import new_row
from layerskip.decoding.config import DecodeConfig, LayerSkipWarning
from layerskip.errors import LayerSkipError
from layerskip.testing import make_exact_from, make_random_model

LENGTHS = [6, 1, 13, 4]
# the suite's compiled model and drafting (tests/evaluation/test_bench.py compiles the same graphs: inductor's cache)
COMPILED_MODEL = dict(arch="llama", num_layers=2, hidden_size=32, num_heads=2, vocab_size=320, seed=0)
COMPILED_DRAFT_VOCAB = list(range(0, 320, 2))
ARCHS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "mistral-window"]
SETTINGS = [("autoregressive", {}), ("early_exit", dict(exit_layer=2)),
            ("self_speculative", dict(exit_layer=2, num_speculations=3)),
            ("self_speculative", dict(exit_layer=1, num_speculations=5, draft_vocab=list(range(0, 256, 3))))]


def prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def model_for(tiny_models, name):
    return tiny_models.get(name) or make_random_model("mistral", num_layers=4, num_kv_heads=2, head_dim=16,
                                                      sliding_window=6, seed=3)  # window < sequence


def static_decode(model, batch, compile=False, graphs=False, **options):
    """Decode `batch` on the static path (compile=False: the same functions, run eagerly); the rows afterwards."""
    engine = layerskip.prepare(model)
    cfg = DecodeConfig(**options).resolve(model)
    d = cfg.num_speculations if cfg.strategy == "self_speculative" else None
    decoder = static.StaticDecoder(engine, rows=len(batch), capacity=static.capacity_for(
        [len(p) for p in batch], cfg.max_new_tokens, d), num_layers=cfg.exit_layer or engine.num_layers,
        num_speculations=d, vocab=cfg.draft_vocab_tensor(engine.device), compile=compile, graphs=graphs)
    rows = [new_row(engine, cfg, b, p) for b, p in enumerate(batch)]
    with torch.inference_mode():
        decoder.warm_up()
        static.decode_static(decoder, rows)
    return rows


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("strategy,options", SETTINGS)
def test_static_rows_equal_the_eager_path(tiny_models, name, strategy, options):
    model = model_for(tiny_models, name)
    kw = dict(strategy=strategy, max_new_tokens=21, eos_token_id=[], **options)
    batch = prompts()
    eager = [layerskip.generate(model, p, **kw).token_ids for p in batch]
    for B in (1, 4):
        rows = static_decode(model, batch[:B], **kw)
        assert [r.generated for r in rows] == eager[:B]
    if strategy == "self_speculative":  # lossless: the autoregressive output
        assert eager == [layerskip.generate(model, p, max_new_tokens=21, eos_token_id=[]).token_ids for p in batch]
        assert all(r.stats.drafted > 0 and r.stats.rounds > 1 for r in rows)


def test_rows_ending_in_different_rounds_stay_frozen(tiny_models):
    model = tiny_models["llama"]
    batch = prompts()
    free = layerskip.generate(model, batch[1], max_new_tokens=24, eos_token_id=[]).token_ids
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=4, max_new_tokens=24, eos_token_id=free[4])
    alone = [layerskip.generate(model, p, **kw) for p in batch]
    rows = static_decode(model, batch, **kw)
    assert [r.generated for r in rows] == [a.token_ids for a in alone]
    assert [r.stats.stop_reason for r in rows] == [a.stats.stop_reason for a in alone]
    assert "eos" in {r.stats.stop_reason for r in rows}
    assert rows[1].generated[-1] == free[4] and len(rows[1].generated) <= 5


def test_exact_drafts_are_all_accepted():
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=1)
    make_exact_from(model, 2)
    rows = static_decode(model, prompts()[:2], strategy="self_speculative", exit_layer=2, num_speculations=5,
                         max_new_tokens=30, eos_token_id=[])
    for r in rows:
        assert r.stats.acceptance_rate == 1.0 and r.stats.accepted_per_round[1:-1] == [5] * (r.stats.rounds - 2)


@pytest.mark.parametrize("name", ["llama", "mistral-window", "qwen3"])
def test_traced_as_one_graph_that_never_recompiles(tiny_models, name):
    """fullgraph=True fails on any graph break; error_on_recompile fails if a later round retraces."""
    model = model_for(tiny_models, name)
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=3, max_new_tokens=20, eos_token_id=[])
    batch = prompts()[:2]
    engine = layerskip.prepare(model)
    cfg = DecodeConfig(**kw).resolve(model)
    decoder = static.StaticDecoder(engine, rows=2, capacity=64, num_layers=2, num_speculations=3, compile="eager")
    rows = [new_row(engine, cfg, b, p) for b, p in enumerate(batch)]
    with torch.inference_mode():
        decoder.warm_up()
        with torch._dynamo.config.patch(error_on_recompile=True):
            static.decode_static(decoder, rows)
    assert [r.generated for r in rows] == [layerskip.generate(model, p, **kw).token_ids for p in batch]


def test_compiled_generate_matches_and_reuses_its_compile():
    """The suite's one inductor compile: a small model, self-speculative with a draft vocabulary."""
    model = make_random_model(**COMPILED_MODEL)
    engine = layerskip.prepare(model)
    ids = [5, 7, 9, 11, 3, 2]
    reference = layerskip.generate(engine, ids, max_new_tokens=20, eos_token_id=[]).token_ids
    kw = dict(strategy="self_speculative", exit_layer=1, num_speculations=2, draft_vocab=COMPILED_DRAFT_VOCAB,
              max_new_tokens=20, eos_token_id=[], compile=True)
    first = layerskip.generate(engine, ids, **kw)
    assert first.token_ids == reference
    assert first.stats.compile_s > 0 and first.stats.total_s < first.stats.compile_s + 60
    again = layerskip.generate(engine, ids[:3] + ids, **kw)  # the same capacity bucket: replayed, not compiled
    assert again.stats.compile_s == 0.0
    assert again.token_ids == layerskip.generate(engine, ids[:3] + ids, max_new_tokens=20, eos_token_id=[]).token_ids
    assert len(engine.static_decoders) == 1


def test_compile_is_refused_where_it_cannot_run(tiny_llama):
    ids = [1, 2, 3]
    for options, message in [
        (dict(do_sample=True), "decodes greedily"),
        (dict(strategy="self_speculative", exit_layer="auto"), "needs a fixed exit layer"),
        (dict(strategy="self_speculative", exit_layer=2, confidence_threshold=0.5), "confidence threshold"),
        (dict(compile="yes"), "compile must be True or False"),
    ]:
        with pytest.raises(LayerSkipError, match=message):
            layerskip.generate(tiny_llama, ids, compile=options.pop("compile", True), **options)
    with pytest.raises(LayerSkipError, match="timings=True"):
        layerskip.generate(tiny_llama, ids, compile=True, timings=True)


def test_a_stored_confidence_threshold_is_dropped_with_a_warning(tiny_llama):
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=0)
    model.config.layerskip = {"exit_layer": 2, "num_speculations": 3, "confidence_threshold": 0.6}
    with pytest.warns(LayerSkipWarning, match="stored confidence threshold 0.6"):
        cfg = DecodeConfig("self_speculative", compile=True).resolve(model)
    assert cfg.confidence_threshold == 0.0 and cfg.exit_layer == 2 and cfg.compile


def test_capacity_bounds_every_write():
    cap = static.capacity_for([10, 300], 128, 8)
    assert cap % static.CAPACITY_STEP == 0 and cap >= 300 + 128 + 8 + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_replay_the_eager_tokens(compile):
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=1).cuda()
    batch = prompts()[:2]
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=3, max_new_tokens=20, eos_token_id=[])
    eager = [layerskip.generate(model, p, **kw).token_ids for p in batch]
    rows = static_decode(model, batch, compile=compile, graphs=True, **kw)
    assert [r.generated for r in rows] == eager
