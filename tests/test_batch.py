"""Batched decoding: every row equals decoding its prompt alone (the slow reference), whatever the batch does."""
import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.testing import make_exact_from, make_random_model

LENGTHS = [1, 7, 23, 40, 3]


def prompts(lengths=LENGTHS, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def exact_model(exit_layer=2, seed=1):
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=seed)
    make_exact_from(model, exit_layer)
    return model


STRATEGIES = [("autoregressive", {}), ("early_exit", dict(exit_layer=2)),
              ("self_speculative", dict(exit_layer=2, num_speculations=3)),
              ("self_speculative", dict(exit_layer=1, num_speculations=5, confidence_threshold=0.02,
                                        draft_vocab=list(range(0, 256, 3))))]


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "mistral-window"])
@pytest.mark.parametrize("strategy,options", STRATEGIES)
def test_every_row_equals_its_batch_1_output(tiny_models, name, strategy, options):
    model = tiny_models.get(name) or make_random_model("mistral", num_layers=4, num_kv_heads=2, head_dim=16,
                                                       sliding_window=6, seed=3)  # window < sequence
    engine = layerskip.prepare(model)
    batch = prompts()
    kw = dict(strategy=strategy, max_new_tokens=18, eos_token_id=[], **options)
    alone = [layerskip.generate(engine, p, **kw).token_ids for p in batch]
    for B in (1, 2, 5):
        out = layerskip.generate(engine, batch[:B], **kw)
        assert isinstance(out, list) and [r.token_ids for r in out] == alone[:B]


def test_rows_stop_in_different_rounds_on_eos_and_length():
    model = exact_model()
    batch = prompts()
    free = layerskip.generate(model, batch, max_new_tokens=20, eos_token_id=[])
    eos = free[1].token_ids[5]  # ends row 1 mid-round; other rows may or may not hold it
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=6, max_new_tokens=20, eos_token_id=eos)
    alone = [layerskip.generate(model, p, **kw) for p in batch]
    out = layerskip.generate(model, batch, **kw)
    assert [r.token_ids for r in out] == [r.token_ids for r in alone]
    assert [r.stats.stop_reason for r in out] == [r.stats.stop_reason for r in alone]
    assert {r.stats.stop_reason for r in out} == {"eos", "length"}
    assert all(r.stats.acceptance_rate == 1.0 for r in out if r.stats.stop_reason == "length")  # exact drafts


def test_stop_strings_per_row(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval(), AutoTokenizer.from_pretrained(tiny_checkpoint)
    texts = ["def main():\n    return", "import os\n", "class A:\n    x ="]
    ids = [tok(t).input_ids for t in texts]
    free = layerskip.generate(model, ids[0], max_new_tokens=30, eos_token_id=[], tokenizer=tok).text
    stop = free[6:9]
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=4, max_new_tokens=30, eos_token_id=[],
              stop_strings=[stop], tokenizer=tok)
    alone = [layerskip.generate(model, p, **kw) for p in ids]
    out = layerskip.generate(model, ids, **kw)
    assert [(r.token_ids, r.text, r.stats.stop_reason) for r in out] == \
           [(r.token_ids, r.text, r.stats.stop_reason) for r in alone]
    assert out[0].stats.stop_reason == "stop_string"


@pytest.mark.parametrize("strategy,options", [("autoregressive", {}),
                                              ("self_speculative", dict(exit_layer=1, num_speculations=3))])
def test_sampled_row_b_equals_its_prompt_alone_with_seed_plus_b(tiny_llama, strategy, options):
    batch = prompts()
    kw = dict(strategy=strategy, max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[], **options)
    out = layerskip.generate(tiny_llama, batch, seed=10, **kw)
    assert [r.token_ids for r in out] == [layerskip.generate(tiny_llama, p, seed=10 + b, **kw).token_ids
                                          for b, p in enumerate(batch)]


def test_padded_tensor_with_attention_mask_equals_the_list(tiny_llama):
    batch = prompts([3, 6, 1])
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    a = layerskip.generate(tiny_llama, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    b = layerskip.generate(tiny_llama, batch, max_new_tokens=6, eos_token_id=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_streaming_per_row_and_finished_rows_leave(tiny_llama):
    engine = layerskip.prepare(tiny_llama)
    sizes, run = [], engine.run
    engine.run = lambda h, *a, **kw: sizes.append(len(kw.get("lengths") or h)) or run(h, *a, **kw)  # rows
    got = {}
    batch = prompts([4, 9, 2])
    free = layerskip.generate(tiny_llama, batch[1], max_new_tokens=10, eos_token_id=[]).token_ids
    out = layerskip.generate(engine, batch, max_new_tokens=10, eos_token_id=free[1],
                             streamer=lambda row, ids: got.setdefault(row, []).extend(ids))
    assert {row: got.get(row, []) for row in range(3)} == {row: r.token_ids for row, r in enumerate(out)}
    assert len(out[1].token_ids) == free.index(free[1]) + 1 and sizes[0] == 3 and min(sizes) < 3


def test_bad_batches_are_clear_errors(tiny_llama):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cases = [([], {}, "empty"), ([[1, 2], []], {}, "prompt 1 is empty"),
             (ids, dict(attention_mask=torch.ones(2, 4)), "attention_mask has shape"),
             (ids, dict(attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]])), "not left padding"),
             ([[1, 2], [3, 999]], {}, "outside this model's vocabulary"),
             ([[1, 2], [3]], dict(timings=True), "single prompt")]
    for inputs, kw, match in cases:
        with pytest.raises(LayerSkipError, match=match):
            layerskip.generate(tiny_llama, inputs, max_new_tokens=2, **kw)

    class Streamer:
        def put(self, value): ...
        def end(self): ...

    with pytest.raises(LayerSkipError, match="callable"):
        layerskip.generate(tiny_llama, [[1], [2]], streamer=Streamer())


def test_generate_prompts_file_cli(tiny_checkpoint, tmp_path, capsys):
    import json

    from layerskip.cli import main

    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "import os", "x = 1"]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(src), "--out", str(out),
                 "--batch-size", "2", "--strategy", "self-speculative", "--exit-layer", "2",
                 "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(len(r["token_ids"]) <= 8 for r in rows)
    main(["generate", "--model", str(tiny_checkpoint), "--prompt", "import os", "--strategy", "self-speculative",
          "--exit-layer", "2", "--max-new-tokens", "8"])
    assert capsys.readouterr().out.rstrip("\n") == rows[1]["text"]
    src.write_text('{"text": "no prompt"}\n')
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(src)]) == 2
    assert "needs a non-empty \"prompt\"" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama", "mistral-window", "qwen3"])
@pytest.mark.parametrize("strategy,options,speculate_up_to", [s + (None,) for s in STRATEGIES[::2] + STRATEGIES[3:]]
                         + [STRATEGIES[2] + (2,)])
def test_rows_joining_a_running_batch_equal_their_batch_1_output(tiny_models, name, strategy, options,
                                                                 speculate_up_to):
    """Continuous batching: rows join between rounds (the running rows at other lengths, some leaving), and
    each still equals its prompt decoded alone, greedy and sampled."""
    from layerskip.decoding.batch import Batch, Row
    from layerskip.decoding.config import DecodeConfig
    from layerskip.decoding.result import GenerationStats
    from layerskip.decoding.stopping import StopChecker

    model = tiny_models.get(name) or make_random_model("mistral", num_layers=4, num_kv_heads=2, head_dim=16,
                                                       sliding_window=6, seed=3)
    engine = layerskip.prepare(model)
    batch, budgets = prompts([5, 1, 30, 12, 2, 17]), [9, 14, 6, 20, 11, 8]
    configs = [DecodeConfig(strategy=strategy, max_new_tokens=n, eos_token_id=(), **options) for n in budgets]
    configs[3] = configs[3].replace(do_sample=True, seed=5, temperature=0.9)  # one sampled row among greedy ones
    alone = [layerskip.generate(engine, p, c).token_ids for p, c in zip(batch, configs)]
    cfg = configs[0].resolve(model)
    running = Batch(engine, strategy=cfg.strategy, exit_layer=cfg.exit_layer, num_speculations=cfg.num_speculations,
                    draft_vocab=cfg.draft_vocab_tensor(engine.device), confidence_threshold=cfg.confidence_threshold,
                    speculate_up_to=speculate_up_to)  # 2: autoregressive steps while 3 or more rows run
    rows, done, steps = [], [], 0
    for p, c in zip(batch, configs):
        r = c.resolve(model, warn=False)
        gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
        rows.append(Row(len(rows), list(p), StopChecker(r.max_new_tokens, ()), GenerationStats(strategy=r.strategy),
                        r.sampling, gen))
    joins = {0: [0, 1], 1: [2], 3: [3, 4], 4: [5]}  # step -> rows that join before it
    with torch.inference_mode():
        while steps in joins or len(running):
            running.add([rows[i] for i in joins.get(steps, [])])
            done += running.step()
            steps += 1
    assert sorted(r.index for r in done) == list(range(6))
    if speculate_up_to is None:
        assert [r.generated for r in rows] == alone
    else:  # switching between rounds and steps draws a sampled row's randomness differently: greedy rows only
        assert [r.generated for r in rows if not r.params.do_sample] == alone[:3] + alone[4:]


def _reference_drafted(stack, batch, E, d, cut, floor):
    """Slow reference of a batch's first-round greedy drafting: every draft from a fresh pass of its row's whole
    sequence through [0, E) (no cache). A row's drafting ends on a draft below its cut; the batch's where its
    rows' expected accepted drafts (the sum of each row's product of top probabilities) fall below the floor."""
    seqs, chance, drafting = [list(p) for p in batch], [1.0] * len(batch), [True] * len(batch)
    while any(drafting):
        nxt = {}
        for b, ids in enumerate(seqs):
            if drafting[b]:
                h = stack.run(stack.embed(torch.tensor([ids])), 0, E, stack.new_cache(len(ids)), 0)
                p, top = torch.softmax(stack.logits(h[0, -1]), -1).max(-1)
                nxt[b] = (float(p), int(top))
        if sum(chance[b] * p for b, (p, _) in nxt.items() if p >= cut) < floor:
            break
        for b, (p, top) in nxt.items():
            if p < cut:
                drafting[b] = False
                continue
            chance[b] *= p
            seqs[b].append(top)
            drafting[b] = len(seqs[b]) - len(batch[b]) < d
    return [len(s) - len(p) for s, p in zip(seqs, batch)]


def test_a_batch_row_drafts_past_the_batch_1_threshold_down_to_its_own_cut():
    """In a batch a row's own drafting ends below ROW_THRESHOLD x C (decoding/batch.py), not below C: one more
    draft costs its row of a pass that the batch runs anyway. Every row drafts what the slow reference says, and
    on some batches more than a cut at C would let it, and fewer than no cut would (a random model with its head
    scaled up, so that top probabilities spread over (0, 1))."""
    from layerskip.decoding import batch as batch_module
    from layerskip.decoding.batch import Batch, Row
    from layerskip.decoding.result import GenerationStats
    from layerskip.decoding.sampling import SamplingParams
    from layerskip.decoding.stopping import StopChecker

    model = make_random_model("llama", num_layers=4, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    stack = layerskip.prepare(model)
    E, d, C = 1, 8, 0.7
    floor = batch_module.PASS_COST * E / stack.num_layers * 4
    differs = set()
    for seed in range(12):
        rows = prompts([6, 11, 4, 9], seed=seed)
        batch = Batch(stack, strategy="self_speculative", exit_layer=E, num_speculations=d, confidence_threshold=C)
        batch.add([Row(b, list(p), StopChecker(32), GenerationStats("self_speculative"), SamplingParams(), None)
                   for b, p in enumerate(rows)])
        with torch.inference_mode():
            batch.step()
            want = _reference_drafted(stack, rows, E, d, C * batch_module.ROW_THRESHOLD, floor)
            differs |= {cut for cut in (C, 0.0) if _reference_drafted(stack, rows, E, d, cut, floor) != want}
        assert [r.stats.drafted for r in batch.rows] == want, seed
    assert differs == {C, 0.0}  # the test would notice a cut at C, or none
