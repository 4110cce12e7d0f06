"""`layerskip serve`: an OpenAI-compatible server over batched self-speculative decoding.

  cli.py        the command: load the model, bind, run uvicorn
  app.py        the HTTP layer (FastAPI): validation, OpenAI responses, server-sent events
  protocol.py   request and response shapes, OpenAI's error body
  scheduler.py  the thread that owns the model: continuous batching over decoding/batch.py
  metrics.py    Prometheus metrics
FastAPI, uvicorn, sse-starlette and prometheus_client are the "serve" extra; only cli.py is imported without them.
"""
