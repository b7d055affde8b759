"""OpenAI's request and response shapes, so the official client works against `slm serve` unchanged.

Requests are checked strictly: a field of the wrong type, a value out of range, or a field the
API does not have is a 400 naming it (a typo such as "max_token" silently ignored would cost the
user a confusing answer). OpenAI fields that these models cannot honour (penalties, logit_bias)
are accepted at their neutral values only. Every error has OpenAI's JSON shape:
{"error": {"message", "type", "param", "code"}}.

Log-probabilities are the model's own (log-softmax of its logits), before temperature, top-k and
top-p change the distribution that tokens are drawn from.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

Number = Annotated[float, Strict()]  # an int or a float, never a string or a bool

MAX_CHOICES = 16  # n
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # strings in one completion request


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0  # an extension (llama.cpp and vLLM have it too); 0 = off
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Accepted at their neutral values only (checked in `check_sampling`).
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Number] | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = ""
    max_tokens: StrictInt | None = 16  # OpenAI's default
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


def parse_body(raw: bytes, kind: type[BaseModel]) -> Any:
    """The request body as `kind`, or an ApiError naming what is wrong."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ApiError(400, f"{where}: {message}", param=where) from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_sampling(req: _Sampling, max_tokens: int | None, token_limit: int) -> int:
    """Range checks OpenAI makes too; the number of tokens to generate."""
    if max_tokens is None:
        max_tokens = token_limit
    if not 1 <= max_tokens <= token_limit:
        raise ApiError(400, f"max_tokens must be from 1 to {token_limit} (this server's limit), got {max_tokens}",
                       "max_tokens")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(req, name)):
            raise ApiError(400, f"{name} must be a finite number", name)
    if req.temperature < 0:
        raise ApiError(400, f"temperature must not be negative (0 = greedy), got {req.temperature}", "temperature")
    if not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k < 0:
        raise ApiError(400, f"top_k must not be negative (0 = off), got {req.top_k}", "top_k")
    if not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be from 1 to {MAX_CHOICES}, got {req.n}", "n")
    if req.seed is not None and not 0 <= req.seed < 2**63 - MAX_CHOICES:
        raise ApiError(400, "seed must be a non-negative 63-bit integer", "seed")
    stops = stop_strings(req.stop)
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", "stop")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence and frequency penalties are not supported", "presence_penalty")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    return max_tokens


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{param} must be from 0 to {MAX_TOP_LOGPROBS}, got {value}", param)


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
