"""`layerskip serve`: load the model, then serve it over the OpenAI API (serving/app.py) with uvicorn."""
from __future__ import annotations

import logging
import socket

from layerskip.decoding.cli import add_drafting_args, add_model_args, exit_layer_arg
from layerskip.errors import LayerSkipError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible server: streaming, continuous batching, self-speculative decoding",
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, "
                    "/health, /metrics). Requests join the running batch between rounds.")
    add_model_args(p, threads_help="torch CPU threads of the decoding thread (default on a CPU: one fewer than "
                                   "torch's choice, leaving a core to the HTTP layer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed when ready)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as \"model\" (default: the --model spec, or 'layerskip-default')")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="B", help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting to join before new ones get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N",
                   help="max_tokens of a request that gives none (default 128)")
    p.add_argument("--strategy", default="self-speculative",
                   help="default strategy: self-speculative (default) | autoregressive | early-exit; a request "
                        "may choose another with the extra body field \"strategy\"")
    p.add_argument("--exit-layer", type=exit_layer_arg, default=None,
                   help="default E, or 'auto': each batch chooses E and d per round for its size, autoregressive "
                        "steps where no round pays (default: the model's stored value, else auto)")
    p.add_argument("--num-speculations", type=int, default=None, help="default d (default: the model's stored value)")
    add_drafting_args(p)
    p.add_argument("--speculate-up-to", type=int, default=None, metavar="B",
                   help="self-speculative rounds while at most B requests run, autoregressive steps (lossless) "
                        "above; default: always rounds (on a 2-core CPU they stop paying past about 1-2 rows, "
                        "docs/benchmarks.md)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, how long in-flight requests may take to finish (default 30)")
    p.set_defaults(func=run_serve)


def _check(args) -> None:
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--port", args.port, 0),
                             ("--speculate-up-to", args.speculate_up_to or 1, 1)):
        if value < low:
            raise LayerSkipError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise LayerSkipError(f"--port must be <= 65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise LayerSkipError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")


def serve_threads(threads: int | None, device: str | None) -> int | None:
    """The decoding thread's torch CPU threads: as given, else on a CPU one fewer than torch's choice (at least 1).

    The HTTP layer (event loop, JSON, SSE) runs beside the decoding thread. Where torch's OpenMP workers fill
    every core, each wake-up of the event loop stalls a worker and with it every barrier of every matmul:
    measured on a 2-core machine, 2 threads served 46-51 tok/s at concurrency 1 and 1 thread 84-95
    (docs/benchmarks.md, "Serving under load").
    """
    import torch

    if threads is not None or (device or "cpu").split(":")[0] != "cpu":
        return threads
    return max(1, torch.get_num_threads() - 1)


def _read_template(path: str) -> str:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise LayerSkipError(f"--chat-template {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise LayerSkipError(f"--chat-template {path}: the file is empty")
    return text


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LayerSkipError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    try:
        import uvicorn

        from layerskip.serving.app import ServeState, create_app
        from layerskip.serving.metrics import Metrics
        from layerskip.serving.scheduler import Scheduler
    except ImportError as e:
        raise LayerSkipError(f"serving needs the serve extra: pip install 'layerskip[serve]' ({e.name} is missing)")
    from layerskip.decoding.cli import load_engine
    from layerskip.decoding.config import DecodeConfig

    _check(args)
    args.threads = serve_threads(args.threads, args.device)
    defaults = DecodeConfig(strategy=args.strategy, exit_layer=args.exit_layer, num_speculations=args.num_speculations,
                            confidence_threshold=args.confidence_threshold, draft_vocab=args.draft_vocab)
    template = _read_template(args.chat_template) if args.chat_template else None
    sock = _bind(args.host, args.port)  # fail on a busy port before the model loads
    model, tokenizer, engine = load_engine(args)
    if tokenizer is None:
        raise LayerSkipError("this checkpoint has no tokenizer; the server needs one")
    if template is not None:
        tokenizer.chat_template = template
    resolved = defaults.resolve(model)  # the stored settings filled in, checked against the model (warns once)
    if resolved.exit_layer == "auto":  # time the pass costs now, not inside the first request
        from layerskip.decoding import auto

        auto.step_costs(engine, resolved.draft_vocab_tensor(engine.device),
                        args.max_batch_size * ((resolved.num_speculations or auto.MAX_SPECULATIONS) + 1))
    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          metrics=metrics, speculate_up_to=args.speculate_up_to)
    name = args.served_model_name or args.model or "layerskip-default"
    state = ServeState(engine, tokenizer, name, defaults, args.max_tokens, scheduler, metrics, args.api_key,
                       args.shutdown_timeout)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    plan = resolved.strategy.replace("_", "-") + (
        f", exit layer {resolved.exit_layer}" if resolved.exit_layer else "") + (
        f", d={resolved.num_speculations}" if resolved.num_speculations else "")
    banner = (f"layerskip: serving {name!r} ({plan}; max batch {args.max_batch_size}) at "
              f"http://{shown}:{port}/v1")
    config = uvicorn.Config(create_app(state), log_level="info", timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on")
    server = _ready_server(uvicorn, config, banner)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _ready_server(uvicorn, config, banner: str):
    """uvicorn's server, printing our ready line once it accepts connections, and ending with exit code 0 after a
    graceful shutdown on SIGTERM / Ctrl-C (uvicorn itself re-raises the signal once it is done, which would kill
    the process with it). uvicorn is imported lazily (the serve extra)."""
    import contextlib
    import signal
    import threading

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(banner, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)
