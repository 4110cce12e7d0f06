"""`layerskip serve` as a real process on 127.0.0.1 and a free port, driven by the official openai client and httpx.

Bounded: every server is killed at the end of its module, every call has a timeout, and the whole file sends a few
dozen requests of at most a few hundred tokens to the built-in model.
"""
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import layerskip

MODEL = "layerskip-default"
TEMPLATE = "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}# assistant:{% endif %}"
PROMPTS = ["def fib(n):", "import os\n\n\ndef read_lines(path):", "class Stack:\n    def push(self, x):",
           "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"", "def mean(xs):", "for i in range(10):",
           "def parse(text):\n    for line in text.splitlines():", "def add(a, b):\n    return"]


class Server:
    """A `layerskip serve` process; `url` once it printed its ready line."""

    def __init__(self, tmp_path, *args):
        template = tmp_path / "chat.jinja"
        template.write_text(TEMPLATE)
        self.log = open(tmp_path / "server.log", "w+")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, "-m", "layerskip", "serve", "--port", "0", "--threads", "1",
                                      "--chat-template", str(template), *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline and "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        match = re.search(r"at (http://\S+)/v1", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{self.logs()}")
        self.url = match.group(1)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--max-batch-size", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference():
    """Batch-1 `generate` on the built-in model with the server's settings: what every response must equal."""
    model, tokenizer = layerskip.load()
    engine = layerskip.prepare(model)

    def complete(prompt_ids, max_tokens, **kw):
        return layerskip.generate(engine, prompt_ids, strategy="self_speculative", max_new_tokens=max_tokens,
                                  tokenizer=tokenizer, **kw)

    complete.tokenizer = tokenizer
    return complete


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), timeout=60, max_retries=0,
                         **kw)


def metric(server, name, headers=None) -> float:
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def test_completion_chat_and_models(server, reference):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    out = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
    ref = reference(reference.tokenizer(PROMPTS[0]).input_ids, 40)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.stats.num_prompt_tokens, 40)
    ids = reference.tokenizer(PROMPTS[1]).input_ids  # a prompt of token ids
    assert c.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0).choices[0].text == \
        reference(ids, 20).text
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "write fib"}], max_tokens=16,
                                     temperature=0)
    ids = reference.tokenizer.apply_chat_template([{"role": "user", "content": "write fib"}], tokenize=True,
                                                  add_generation_prompt=True, chat_template=TEMPLATE,
                                                  return_dict=False)
    assert chat.choices[0].message.content == reference(list(ids), 16).text
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 16
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_streaming_chunks_add_up_and_stop_strings_are_cut(server, reference):
    c = client(server)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=48, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    ref = reference(reference.tokenizer(PROMPTS[3]).input_ids, 48)
    assert text == ref.text and len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1
    assert chunks[-1].usage.completion_tokens == 48 and not chunks[-1].choices
    stop = ref.text[10:13]  # a stop string the greedy output runs into
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=48, temperature=0, stream=True,
        stop=[stop]))
    assert stop not in streamed
    whole = c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=48, temperature=0, stop=stop)
    assert whole.choices[0].text == ref.text[:ref.text.index(stop)] and whole.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_each_equal_their_batch_1_output(server, reference):
    before = metric(server, "layerskip_round_batch_size_count"), metric(server, "layerskip_round_batch_size_sum")

    def run(prompt):
        c = client(server)
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=64, temperature=0, stream=True))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, PROMPTS))
    assert got == [reference(reference.tokenizer(p).input_ids, 64).text for p in PROMPTS]
    rounds = metric(server, "layerskip_round_batch_size_count") - before[0]
    rows = metric(server, "layerskip_round_batch_size_sum") - before[1]
    assert rows / rounds > 1.5  # they were decoded together, not one after another


def test_sampling_with_a_seed_is_reproducible(server):
    c = client(server)
    kw = dict(model=MODEL, prompt=PROMPTS[4], max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    texts = {c.completions.create(**kw).choices[0].text for _ in range(2)}
    assert len(texts) == 1


BAD = [
    ("{not json", 400, None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": 0, "seed": 3}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5] * 1100}, 400, "prompt"),
    ({"model": MODEL, "prompt": [10 ** 7]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "strategy": "medusa"}, 400, "strategy"),
    ({"model": MODEL, "prompt": "x", "exit_layer": 99}, 400, "exit_layer"),
    ({"model": MODEL, "prompt": "x", "strategy": "autoregressive", "num_speculations": 4}, 400, "num_speculations"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/completions", content=data, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "tool", "content": "x"}]}).status_code == 400
    ok = client(server).completions.create(model=MODEL, prompt="def f():", max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = metric(server, 'layerskip_requests_total{outcome="cancelled"}')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 900, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # the first chunk: the request is running; leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(server, 'layerskip_requests_total{outcome="cancelled"}') > cancelled and \
                metric(server, "layerskip_running_batch_size") == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected request kept its slot")
    assert client(server).completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0).choices


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One row at a time, one waiting, an API key: for the queue limit, auth, and SIGTERM (last)."""
    s = Server(tmp_path_factory.mktemp("serve-small"), "--max-batch-size", "1", "--max-queue", "1", "--api-key",
               "sekrit", "--strategy", "autoregressive")
    yield s
    s.stop()


KEY = {"Authorization": "Bearer sekrit"}


def test_every_request_needs_the_api_key(small_server):
    for path in ("/health", "/v1/models", "/metrics"):
        r = httpx.get(small_server.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(small_server, api_key="wrong").models.list()
    assert client(small_server, api_key="sekrit").models.list().data[0].id == MODEL


def test_a_full_queue_answers_429_with_retry_after(small_server):
    body = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=600, temperature=0, stream=True)
    results = {}
    with httpx.Client(base_url=small_server.url, headers=KEY, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the stream
            next(line for line in lines if line.startswith("data:"))  # it holds the one slot
            waiting = threading.Thread(target=lambda: results.setdefault("waiting", http.post(
                "/v1/completions", json=dict(body, stream=False, max_tokens=5))))
            waiting.start()
            deadline = time.monotonic() + 20
            while metric(small_server, "layerskip_queue_depth", KEY) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            full = http.post("/v1/completions", json=dict(body, stream=False))
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
        waiting.join(60)  # the running stream was closed: the waiting request gets the slot
    assert results["waiting"].status_code == 200 and results["waiting"].json()["usage"]["completion_tokens"] == 5


def test_sigterm_finishes_the_request_in_flight_then_exits_0(small_server, reference):
    proc = small_server.proc
    chunks = []
    with httpx.stream("POST", small_server.url + "/v1/completions", headers=KEY, timeout=60, json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 120, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            if not chunks:
                proc.send_signal(signal.SIGTERM)
            chunks.append(line[5:].strip())
    assert chunks[-1] == "[DONE]"
    text = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1])
    assert text == reference(reference.tokenizer(PROMPTS[0]).input_ids, 120).text
    assert proc.wait(30) == 0, small_server.logs()
