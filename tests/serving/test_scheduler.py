"""The scheduler in-process (a real tiny model): a round that raises fails its batch, and serving goes on."""
import asyncio

import layerskip
from layerskip.decoding.config import DecodeConfig
from layerskip.serving.metrics import Metrics
from layerskip.serving.scheduler import Request, Scheduler


async def outcome(request: Request):
    tokens = []
    while True:
        kind, payload = await asyncio.wait_for(request.events.get(), 30)
        if kind == "tokens":
            tokens += payload
        else:
            return kind, tokens, payload


def test_a_failing_round_fails_its_batch_and_the_scheduler_goes_on(tiny_llama):
    engine = layerskip.prepare(tiny_llama)
    metrics = Metrics()
    scheduler = Scheduler(engine, None, max_batch_size=4, max_queue=4, metrics=metrics)
    config = DecodeConfig(strategy="self_speculative", exit_layer=2, num_speculations=3, max_new_tokens=12,
                          eos_token_id=()).resolve(tiny_llama)
    expected = layerskip.generate(engine, [1, 2, 3], config=DecodeConfig(
        strategy="self_speculative", exit_layer=2, num_speculations=3, max_new_tokens=12, eos_token_id=())).token_ids
    run, calls = engine.run, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return run(*args, **kw)

    async def main():
        loop = asyncio.get_running_loop()
        engine.run = failing
        first = Request([1, 2, 3], config, loop)
        scheduler.submit(first)
        kind, _, message = await outcome(first)
        assert kind == "error" and "device lost" in message
        engine.run = run
        again = [Request([1, 2, 3], config, loop), Request([9, 8, 7, 6, 5], config, loop)]
        for r in again:
            scheduler.submit(r)
        results = [await outcome(r) for r in again]
        assert [k for k, _, _ in results] == ["done", "done"] and results[0][1] == expected
        assert results[0][2].generated == expected

    scheduler.start()
    try:
        asyncio.run(main())
    finally:
        assert scheduler.stop(10)
    assert metrics.requests.labels("error")._value.get() == 1
    assert metrics.requests.labels("finished")._value.get() == 2
