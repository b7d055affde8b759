"""`slm serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

    engine.py         continuous batching: one thread decodes every running sequence together
    protocol.py       OpenAI's request and response shapes, strict checks, errors in its JSON shape
    app.py            the FastAPI routes, streaming (server-sent events), the playground page
    playground.html   the playground: one static page, no build step

The HTTP parts need the `serve` extra (FastAPI and uvicorn); this module imports neither, so the
CLI can say how to install them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields

from slmkit.errors import UserError, show
from slmkit.options import option

EXTRA_HINT = 'slm serve needs FastAPI and uvicorn: pip install -e ".[serve]" (or pip install fastapi uvicorn)'


@dataclass
class ServeOptions:
    """`slm serve`'s settings (its flags are generated from these fields)."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; mind --api-key then)")
    port: int = option(8000, "port to listen on; 0 = a free port, printed at start", bounds=(0, 65535))
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 requests (401 without it)")
    max_concurrency: int = option(64, "requests in flight at once, running or waiting; more get 429",
                                  bounds=(1, 100_000))
    max_batch: int = option(16, "sequences of one model decoding together (continuous batching); 1 = none",
                            bounds=(1, 1024))
    max_tokens_limit: int = option(4096, "the most tokens one request may ask for (max_tokens)",
                                   bounds=(1, 10**7))
    max_body_bytes: int = option(1 << 20, "the largest request body; larger gets 413", bounds=(256, 1 << 30))
    access_log: bool = option(False, "log every request to stderr")

    def validate(self) -> None:
        for f in fields(self):
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds and (isinstance(value, bool) or not isinstance(value, int)
                           or not bounds[0] <= value <= bounds[1]):
                flag = "--" + f.name.replace("_", "-")
                raise UserError(f"{flag} must be an integer from {bounds[0]:,} to {bounds[1]:,}, got {show(value)}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key must not be empty")


def require_extra() -> None:
    """A one-line error naming the install command when FastAPI or uvicorn is missing."""
    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        raise UserError(EXTRA_HINT)
