"""Serving under load: `layerskip serve` self-speculative vs autoregressive, concurrent streaming clients.

For each strategy a server process is started on 127.0.0.1 (a free port) with the built-in model; for each
concurrency c, c clients (threads, the official openai client, streaming, temperature 0) each send their share of
the HumanEval prompts one after another. Reported per (strategy, c): total tokens/s (tokens / wall time of the
run), time to first token and per-token latency (the gaps between a stream's chunks, divided by the tokens in
the chunk) p50 / p95, lost or errored responses, and whether every text equals the other strategy's (greedy
outputs must be identical); then the same against `transformers serve` on the same model (continuous batching,
CPU, fp32), where it starts. Bounded: --requests per concurrency level, --max-tokens each. For our servers also
the rounds each run took and the rows a round served on average (from /metrics: how full the batch was).
With --rounds N our servers are all up at once and each level is driven N times per server, the servers' order
rotated each time, so slow spells of a shared machine fall on every contender; the speedups are the medians of
the per-round ratios.

    python benchmarks/serve_load.py [--concurrency 1,4,16] [--requests 16] [--skip 0] [--max-tokens 128] [--rounds 3]
                                    [--json FILE]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import openai
import torch

from layerskip.evaluation.tasks import load_task
from layerskip.files import write_json
from layerskip.runtime import machine_name

MODEL = "layerskip-default"


def start(strategy: str, max_batch: int, threads: int | None, log, extra=()):
    threads_flag = () if threads is None else ("--threads", str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "layerskip", "serve", "--port", "0", "--strategy", strategy,
                             "--max-batch-size", str(max_batch), *threads_flag, "--max-queue", "256", *extra],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line, deadline = "", time.monotonic() + 180
    while "serving" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    match = re.search(r"at (http://\S+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the {strategy} server did not start")
    return proc, match.group(1) + "/v1"


def start_transformers(port: int, log, threads: int | None = None):
    """`transformers serve` on the same model (continuous batching, CPU, fp32), with `threads` torch threads
    (OMP_NUM_THREADS; None: torch's choice); None if it does not come up."""
    import httpx

    from layerskip.models import default_model_dir

    path = str(default_model_dir())
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", path, "--host", "127.0.0.1", "--port", str(port),
                             "--continuous-batching", "--device", "cpu", "--dtype", "float32"],
                            stdout=log, stderr=log,
                            env=dict(os.environ, HF_HUB_OFFLINE="1",
                                     **({} if threads is None else {"OMP_NUM_THREADS": str(threads)})))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1", path
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    return None


def one(url: str, prompt: str, max_tokens: int, model: str = MODEL) -> dict:
    c = openai.OpenAI(base_url=url, api_key="none", timeout=300, max_retries=0)
    t0 = time.perf_counter()
    stamps, text, tokens = [], [], 0
    try:
        for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
                text.append(chunk.choices[0].text)
    except openai.APIError as e:
        return {"error": str(e)}
    if not tokens:
        return {"error": "no usage in the stream"}
    gaps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)][1:]
    return {"text": "".join(text), "tokens": tokens, "ttft": stamps[0] - t0 if stamps else None,
            "per_token": (stamps[-1] - stamps[0]) / max(1, tokens - 1) if len(stamps) > 1 else None, "gaps": gaps}


def load(url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str = MODEL) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one(url, p, max_tokens, model), prompts))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    q = lambda xs, f: statistics.quantiles(xs, n=100)[f - 1] if len(xs) > 1 else (xs[0] if xs else None)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    per_token = [r["per_token"] for r in ok if r["per_token"] is not None]
    return {"tokens_per_second": sum(r["tokens"] for r in ok) / wall, "wall_s": wall, "requests": len(prompts),
            "errors": len(results) - len(ok), "ttft_p50_s": q(ttft, 50), "ttft_p95_s": q(ttft, 95),
            "per_token_p50_s": q(per_token, 50), "per_token_p95_s": q(per_token, 95),
            "texts": [r.get("text") for r in results]}


def round_rows(url: str) -> tuple[float, float]:
    """(rows summed over rounds, rounds) so far, from our server's /metrics (the layerskip_round_batch_size
    histogram): between two readings, the rounds run and the rows a round served on average."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "layerskip_round_batch_size")
    got = {s.name: s.value for s in family.samples}
    return got["layerskip_round_batch_size_sum"], got["layerskip_round_batch_size_count"]


def median_run(rs: list[dict]) -> dict:
    """The round with the median tokens/s, with every round's tokens/s, errors summed and texts kept from every
    round (None where they differ between rounds)."""
    mid = sorted(rs, key=lambda r: r["tokens_per_second"])[(len(rs) - 1) // 2]
    texts = mid["texts"] if all(r["texts"] == mid["texts"] for r in rs) else [None] * len(mid["texts"])
    return dict(mid, errors=sum(r["errors"] for r in rs), texts=texts,
                tokens_per_second_rounds=[r["tokens_per_second"] for r in rs])


def paired(rs: list[dict], base: list[dict]) -> float:
    """The median over rounds of rs' tokens/s over base's in the same round."""
    return statistics.median(a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(rs, base))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (HumanEval prompts)")
    p.add_argument("--skip", type=int, default=0, help="HumanEval prompts left out at the start (0: prompts 0..)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="our servers' --threads (default: theirs: one fewer than torch's choice on a CPU)")
    p.add_argument("--speculate-up-to", type=int, default=None,
                   help="also serve self-speculative with --speculate-up-to B (rounds only while <= B requests run)")
    p.add_argument("--auto", action="store_true",
                   help="also serve self-speculative with --exit-layer auto (E and d per round for the batch's size)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip `transformers serve` (the peer)")
    p.add_argument("--port", type=int, default=18731, help="for `transformers serve` (it takes no port 0)")
    p.add_argument("--rounds", type=int, default=1,
                   help="drive our servers this many times per level, interleaved (all up at once, order rotated); "
                        "reported: each server's median round, and the median of the per-round ratios")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    from layerskip.serving.cli import serve_threads

    ours_threads = args.threads or serve_threads(None, "cpu")
    tf_threads = [None] if ours_threads == torch.get_num_threads() else [None, ours_threads]  # its default, ours
    prompts = [s.prompt for s in load_task("humaneval", limit=args.skip + args.requests).samples[args.skip:]]
    report = {"machine": f"{machine_name()}, "
                         f"server threads: {ours_threads} (ours), "
                         f"{' and '.join(str(t or torch.get_num_threads()) for t in tf_threads)} (transformers serve), fp32",
              "setup": f"built-in model, {args.requests} HumanEval prompts per level "
                       f"({args.skip}..{args.skip + args.requests - 1}), {args.max_tokens} new tokens, "
                       f"greedy, streaming, max batch {args.max_batch_size}",
              "by_concurrency": {}}
    runs, rounds = {}, {}
    with tempfile.TemporaryFile("w+") as log:
        contenders = [("autoregressive", "autoregressive", ()), ("self-speculative", "self-speculative", ())]
        if args.speculate_up_to:
            contenders.append((f"self-speculative-up-to-{args.speculate_up_to}", "self-speculative",
                               ("--speculate-up-to", str(args.speculate_up_to))))
        if args.auto:
            contenders.append(("self-speculative-auto", "self-speculative", ("--exit-layer", "auto")))
        servers = {}  # every one of ours up at once (an idle server waits on a condition, costing nothing)
        try:
            for label, strategy, extra in contenders:
                servers[label] = start(strategy, args.max_batch_size, args.threads, log, extra)
                one(servers[label][1], "def f():", 8)  # warm-up
            for rnd in range(args.rounds):
                for i, c in enumerate(levels):
                    shift = (rnd + i) % len(contenders)  # rotated: no contender always runs first
                    for label, _, _ in contenders[shift:] + contenders[:shift]:
                        url = servers[label][1]
                        before = round_rows(url)
                        r = load(url, prompts, c, args.max_tokens)
                        rows, n = (a - b for a, b in zip(round_rows(url), before))
                        r.update(rounds=n, rows_per_round=rows / n if n else None)
                        rounds.setdefault((label, c), []).append(r)
                        print(f"round {rnd + 1} {label} c={c}: {r['tokens_per_second']:.1f} tok/s, "
                              f"ttft p50 {r['ttft_p50_s']:.3f} s, {r['rows_per_round'] or 0:.2f} rows a round, "
                              f"errors {r['errors']}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
        for key, rs in rounds.items():
            runs[key] = median_run(rs)
        for threads in tf_threads if args.transformers else ():
            name = "transformers" if threads is None else f"transformers-{threads}-threads"
            started = start_transformers(args.port, log, threads)
            if not started:
                log.seek(0)
                report["transformers_serve"] = "did not start: " + log.read()[-1500:]
                break
            proc, url, path = started
            try:
                one(url, "def f():", 8, path)
                for c in levels:
                    runs[name, c] = r = load(url, prompts, c, args.max_tokens, path)
                    print(f"{name} serve c={c}: {r['tokens_per_second']:.1f} tok/s, errors {r['errors']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    for c in levels:
        ar, ss = runs["autoregressive", c], runs["self-speculative", c]
        report["by_concurrency"][str(c)] = {
            "autoregressive": {k: v for k, v in ar.items() if k != "texts"},
            "self_speculative": {k: v for k, v in ss.items() if k != "texts"},
            "speedup": paired(rounds["self-speculative", c], rounds["autoregressive", c]),
            "identical_outputs": ar["texts"] == ss["texts"] and None not in ar["texts"]}
        up = runs.get((f"self-speculative-up-to-{args.speculate_up_to}", c))
        if up:
            report["by_concurrency"][str(c)].update(
                self_speculative_up_to={k: v for k, v in up.items() if k != "texts"},
                up_to_speedup=paired(rounds[f"self-speculative-up-to-{args.speculate_up_to}", c],
                                     rounds["autoregressive", c]),
                up_to_identical_outputs=up["texts"] == ar["texts"])
        au = runs.get(("self-speculative-auto", c))
        if au:
            report["by_concurrency"][str(c)].update(
                self_speculative_auto={k: v for k, v in au.items() if k != "texts"},
                auto_speedup=paired(rounds["self-speculative-auto", c], rounds["autoregressive", c]),
                auto_identical_outputs=au["texts"] == ar["texts"])
        peers = {name: runs[name, c] for name, level in runs if level == c and name.startswith("transformers")}
        for name, tf in peers.items():
            key = "transformers_serve" + name[len("transformers"):].replace("-", "_")
            report["by_concurrency"][str(c)].update({
                key: {k: v for k, v in tf.items() if k != "texts"},
                f"ours_autoregressive_over_{key}": ar["tokens_per_second"] / tf["tokens_per_second"],
                f"{key}_outputs_equal_ours": tf["texts"] == ar["texts"]})
        if peers:  # the peer at its best thread count
            best = max(r["tokens_per_second"] for r in peers.values())
            report["by_concurrency"][str(c)]["ours_autoregressive_over_best_transformers"] = ar["tokens_per_second"] / best
    import json
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
