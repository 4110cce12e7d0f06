"""The OpenAI API's request and response shapes, as far as this server implements them.

Requests are pydantic models that forbid unknown fields: a field we do not implement is a 400 naming it, never
ignored. Fields: model, prompt (a string, one string in a list, or a list of token ids) / messages, max_tokens,
temperature (0 = greedy, as in the OpenAI API; omitted: the model's generation config, greedy unless it says to
sample), top_p, stop (a string or up to 4), seed, stream, stream_options.include_usage, n (1 only); LayerSkip's own
as extra body fields: strategy, exit_layer, num_speculations, confidence_threshold. Errors are OpenAI's body:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Common(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    # LayerSkip's own (the openai client sends them with extra_body=...)
    strategy: StrictStr | None = None
    exit_layer: StrictInt | Literal["auto"] | None = None
    num_speculations: StrictInt | None = None
    confidence_threshold: Number | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)  # the chat API's newer name


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic / JSON error of a request as one OpenAI error naming the field."""
    e = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported field {param!r}: this server does not implement it", param=param,
                        code="unsupported_field")
    if e.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", param=param)
    return APIError(400, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param=param)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(stop_reason: str | None) -> str:
    """Our stop reason -> OpenAI's: EOS or a stop string is "stop", max_tokens "length"."""
    return "length" if stop_reason == "length" else "stop"


def layerskip_stats(stats) -> dict:
    """Our own figures beside OpenAI's fields (clients ignore unknown fields)."""
    return {"strategy": stats.strategy, "exit_layer": stats.exit_layer, "num_speculations": stats.num_speculations,
            "acceptance_rate": stats.acceptance_rate, "tokens_per_round": stats.tokens_per_round,
            "time_to_first_token_s": stats.first_token_s}


class Responses:
    """Builds one request's response objects (its id, kind and model fixed), whole or as stream chunks."""

    def __init__(self, kind: str, model: str, request_id: int):
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model, self.created = model, int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, text: str, reason: str, use: dict, stats: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
            return self._envelope("chat.completion", [choice], usage=use, layerskip=stats)
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self._envelope("text_completion", [choice], usage=use, layerskip=stats)

    def chunk(self, text: str | None, reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else (
                {} if text is None else {"content": text})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": reason,
                                                             "logprobs": None}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": reason,
                                                   "logprobs": None}])

    def usage_chunk(self, use: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=use)
