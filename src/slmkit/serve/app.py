"""The HTTP side of `slm serve`: FastAPI routes in OpenAI's shapes over one batching engine per model.

A request becomes one engine `Sequence` per choice (each prompt times `n`). The engine's thread
hands tokens to the event loop once per decoding iteration; each choice turns its tokens into
text (stop strings held back and cut, as `slm generate` does) and a streamed response sends what
has arrived since its last chunk, so a slow client gets fewer, larger chunks instead of falling
behind. A client that goes away cancels its sequences, which frees their cache rows at the next
token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.api import LanguageModel
from slmkit.chat import TURN_STOPS, render_chat
from slmkit.errors import UserError
from slmkit.generate import GenerationConfig, TextStream
from slmkit.serve import ServeOptions
from slmkit.serve.engine import Engine, EngineLoop, Event, PromptLogprobs, Sequence, Token
from slmkit.serve.protocol import (
    MAX_PROMPTS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_logprobs,
    check_sampling,
    envelope,
    new_id,
    parse_body,
    sse,
    stop_strings,
    usage,
)


@dataclass
class ServedModel:
    name: str
    lm: LanguageModel
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "slmkit",
                "context_length": self.lm.config.block_size, "parameters": self.lm.model.num_params()}


class Choice:
    """One choice of a response: its tokens turned into text and log-probabilities as they come."""

    def __init__(self, index: int, seq: Sequence, lm: LanguageModel, stops: tuple[str, ...], reply: bool):
        self.index, self.seq = index, seq
        self.text = TextStream(lm.tokenizer, stops)
        self.reply = reply  # a chat reply: leading whitespace after "Assistant:" is not part of it
        self.started = False
        self.pending = ""  # text not yet sent
        self.entries: list[Token] = []  # log-probabilities not yet sent
        self.prompt_entries: list[Token] | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None

    def take(self, event: Event, engine: Engine) -> None:
        if self.finish_reason is not None:
            return  # tokens drawn before the engine saw the cancellation
        if isinstance(event, PromptLogprobs):
            self.prompt_entries = event.entries
        elif isinstance(event, Token):
            self.completion_tokens += 1
            if self.seq.gen.stop_at_eot and event.id == engine.eot_id:
                return  # end-of-text is not text; Finished("stop") follows
            self._add(self.text.push(event.id))
            self.entries.append(event)
            if self.text.stopped:
                self.finish_reason = "stop"
                engine.cancel(self.seq)
        elif event.reason in ("length", "stop"):
            self._add(self.text.finish())
            self.finish_reason = event.reason
        else:
            self.finish_reason = "error"
            self.error = event.message or "generation was cancelled"

    def _add(self, piece: str) -> None:
        if self.reply and not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        self.pending += piece

    def drain(self) -> tuple[str, list[Token]]:
        out = self.pending, self.entries
        self.pending, self.entries = "", []
        return out


class Job:
    """A request's choices and the queue their events arrive in."""

    def __init__(self, served: ServedModel):
        self.served = served
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self.released = False  # its place among the server's requests in flight

    def add(self, seq: Sequence, stops: tuple[str, ...], reply: bool) -> None:
        seq.tag = (self, len(self.choices))
        self.choices.append(Choice(len(self.choices), seq, self.served.lm, stops, reply))

    def start(self) -> None:
        for choice in self.choices:
            self.served.engine.submit(choice.seq)

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                self.served.engine.cancel(choice.seq)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def updates(self) -> AsyncIterator[list[Choice]]:
        """The choices that changed, each time events arrive, until every choice is over."""
        while not self.done:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            changed = {}
            for index, event in items:
                choice = self.choices[index]
                choice.take(event, self.served.engine)
                changed[index] = choice
            yield [changed[i] for i in sorted(changed)]

    def raise_error(self) -> None:
        failed = [c.error for c in self.choices if c.error]
        if failed:
            raise ApiError(500, failed[0], kind="server_error")


def dispatch(batch: list[tuple[Sequence, Event]]) -> None:
    """In the event loop: each event into its request's queue."""
    for seq, event in batch:
        job, index = seq.tag
        job.queue.put_nowait((index, event))


class Server:
    """The served models, each with its engine in `engines` (an EngineLoop the caller runs), and the
    limits of `options`."""

    def __init__(self, models: list[ServedModel], options: ServeOptions, engines: EngineLoop):
        self.models = {m.name: m for m in models}
        self.options = options
        self.in_flight = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop, once the app has started
        for m in models:
            lm = m.lm
            m.engine = engines.engine(lm.model, lm.device, lm.dtype, lm.weights, lm.tokenizer.special.get("eot"),
                                      lm.tokenizer.vocab_size, options.max_batch, self.deliver)

    def started(self) -> None:
        self.loop = asyncio.get_running_loop()

    def deliver(self, batch: list[tuple[Sequence, Event]]) -> None:
        """From the engines' thread: hand the events to the event loop."""
        self.loop.call_soon_threadsafe(dispatch, batch)

    # ---------------------------------------------------------------- request plumbing

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit:,} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over this server's limit of {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def pick(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, f"say which model: one of {', '.join(self.models)}", "model")
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist here; this server has {', '.join(self.models)}",
                           "model", code="model_not_found")
        return self.models[name]

    def admit(self) -> None:
        if self.in_flight >= self.options.max_concurrency:
            raise ApiError(429, f"the server is busy ({self.in_flight} requests in flight, the most it takes is "
                                f"{self.options.max_concurrency}); retry shortly", kind="rate_limit_error")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    # ---------------------------------------------------------------- building jobs

    def prompt_ids(self, served: ServedModel, prompt: str | list[int]) -> list[int]:
        lm = served.lm
        try:
            ids = lm.tokenizer.check_ids(prompt) if isinstance(prompt, list) else lm._prompt_ids(prompt)
        except UserError as exc:
            raise ApiError(400, str(exc), "prompt") from None
        limit = lm.config.block_size
        if len(ids) > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {limit}", "prompt",
                           code="context_length_exceeded")
        return ids

    def sequences(self, job: Job, ids: list[int], req, max_tokens: int, logprobs: int | None, echo: bool,
                  stops: tuple[str, ...], reply: bool) -> None:
        """The request's `n` choices for one prompt."""
        for j in range(req.n):
            gen = GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                   top_p=req.top_p, stop=stops)
            seed = None if req.seed is None else req.seed + j  # as `slm generate --seed S --num-samples n`
            seq = Sequence(ids, gen, seed=seed, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
            job.add(seq, stops, reply)
        job.prompt_tokens += len(ids)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None, on_startup=[server.started])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": server.in_flight,
                "models": {m.name: m.engine.stats() for m in server.models.values()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        return {"object": "list", "data": [m.card() for m in server.models.values()]}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = importlib.resources.files("slmkit.serve").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.authorize(request)
        req = parse_body(await server.read_body(request), CompletionRequest)
        return await _completions(server, request, req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        server.authorize(request)
        req = parse_body(await server.read_body(request), ChatRequest)
        return await _chat(server, request, req)

    return app


# -------------------------------------------------------------------- /v1/completions


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]  # one prompt given as token ids
    if not prompt or len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"prompt must be a string or a list of 1 to {MAX_PROMPTS} prompts", "prompt")
    return list(prompt)


async def _completions(server: Server, request: Request, req: CompletionRequest) -> Response:
    served = server.pick(req.model)
    max_tokens = check_sampling(req, req.max_tokens, server.options.max_tokens_limit)
    check_logprobs(req.logprobs, "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of is not supported (other than equal to n)", "best_of")
    if req.suffix:
        raise ApiError(400, "suffix is not supported", "suffix")
    job = Job(served)
    stops = stop_strings(req.stop)
    prompts = _prompts(req.prompt)
    texts = []
    for prompt in prompts:
        ids = server.prompt_ids(served, prompt)
        texts.append(served.lm.tokenizer.decode(ids) if isinstance(prompt, list) else prompt)
        server.sequences(job, ids, req, max_tokens, req.logprobs, req.echo, stops, reply=False)
    echoes = [texts[i // req.n] if req.echo else "" for i in range(len(job.choices))]
    render = _CompletionRender(served, req.logprobs, echoes)
    return await _respond(server, request, job, req, render)


class _CompletionRender:
    """Choices and chunks of /v1/completions (OpenAI's legacy `text_completion` objects)."""

    kind, chunk_kind, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, served: ServedModel, logprobs: int | None, echoes: list[str]):
        self.tokenizer = served.lm.tokenizer
        self.logprobs = logprobs
        self.echoes = echoes  # per choice: the prompt text, when echo is on
        self.offsets = [0] * len(echoes)

    def head(self, choice: Choice) -> tuple[str, list[Token]]:
        """What goes before the first generated text: the echoed prompt and its log-probabilities."""
        return self.echoes[choice.index], (choice.prompt_entries or []) if self.echoes[choice.index] else []

    def logprob_block(self, index: int, entries: list[Token]) -> dict | None:
        if self.logprobs is None:
            return None
        names = self.tokenizer.token_strings([e.id for e in entries])
        offsets = []
        for name in names:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(name)
        return {
            "tokens": names,
            "token_logprobs": [e.logprob for e in entries],  # None for an echoed prompt's first token
            "top_logprobs": [None if e.top is None else {self.tokenizer.token_strings([i])[0]: lp for i, lp in e.top}
                             for e in entries] if self.logprobs > 0 else None,
            "text_offset": offsets,
        }

    def choice(self, choice: Choice, text: str, entries: list[Token], first: bool, final: bool,
               stream: bool = True) -> dict:
        lead, lead_entries = self.head(choice) if first else ("", [])
        block = self.logprob_block(choice.index, lead_entries + entries)
        return {"index": choice.index, "text": lead + text, "logprobs": block,
                "finish_reason": choice.finish_reason if final else None}


# -------------------------------------------------------------------- /v1/chat/completions


async def _chat(server: Server, request: Request, req: ChatRequest) -> Response:
    served = server.pick(req.model)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    # Without a limit a reply may fill the model's context (it usually stops at the next turn first).
    asked = req.max_completion_tokens or req.max_tokens
    limit = server.options.max_tokens_limit
    max_tokens = check_sampling(req, min(limit, served.lm.config.block_size) if asked is None else asked, limit)
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        prompt = render_chat(messages)
    except UserError as exc:
        raise ApiError(400, str(exc), "messages") from None
    job = Job(served)
    ids = server.prompt_ids(served, prompt)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    server.sequences(job, ids, req, max_tokens, logprobs, False, stop_strings(req.stop) + TURN_STOPS, reply=True)
    return await _respond(server, request, job, req, _ChatRender(served, logprobs))


class _ChatRender:
    """Choices and chunks of /v1/chat/completions."""

    kind, chunk_kind, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, served: ServedModel, logprobs: int | None):
        self.tokenizer = served.lm.tokenizer
        self.logprobs = logprobs

    def _entry(self, tid: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(tid)
        return {"token": self.tokenizer.token_strings([tid])[0], "logprob": logprob, "bytes": list(raw)}

    def logprob_block(self, entries: list[Token]) -> dict | None:
        if self.logprobs is None:
            return None
        return {"content": [{**self._entry(e.id, e.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in (e.top or [])]} for e in entries]}

    def choice(self, choice: Choice, text: str, entries: list[Token], first: bool, final: bool,
               stream: bool = True) -> dict:
        body = {"index": choice.index, "logprobs": self.logprob_block(entries),
                "finish_reason": choice.finish_reason if final else None}
        if stream:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            body["delta"] = delta
        else:
            body["message"] = {"role": "assistant", "content": text}
        return body


# -------------------------------------------------------------------- both endpoints


async def _respond(server: Server, request: Request, job: Job, req, render) -> Response:
    server.admit()
    try:
        job.start()
    except BaseException:
        server.release()
        raise
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_stream(job, render, include_usage), lambda: _end(server, job))
    try:
        await _until_done_or_gone(request, job)
    finally:
        _end(server, job)
    job.raise_error()
    return JSONResponse(_whole(job, render))


class _EventStream(StreamingResponse):
    """Server-sent events that always run `on_close` at the end, also when the client went away
    before the first chunk (then the body's generator never starts, and its own cleanup would not
    run)."""

    def __init__(self, body: AsyncIterator[bytes], on_close):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _end(server: Server, job: Job) -> None:
    """The request is over (answered, failed or abandoned): free its rows and its place, once."""
    job.cancel()
    if not job.released:
        job.released = True
        server.release()


async def _until_done_or_gone(request: Request, job: Job) -> None:
    """Wait for every choice; a client that disconnects first cancels them."""

    async def consume() -> None:
        async for _ in job.updates():
            pass

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        work.cancel()
    if work.done() and not work.cancelled() and work.exception() is not None:
        raise work.exception()


def _whole(job: Job, render) -> dict:
    choices = []
    for c in job.choices:
        text, entries = c.drain()
        choices.append(render.choice(c, text, entries, first=True, final=True, stream=False))
    total = sum(c.completion_tokens for c in job.choices)
    return envelope(render.kind, new_id(render.id_prefix), job.served.name, choices, usage(job.prompt_tokens, total))


async def _stream(job: Job, render, include_usage: bool) -> AsyncIterator[bytes]:
    """One chunk per update with each changed choice's new text; an error event if generation
    failed; the usage chunk when asked for; then [DONE]."""
    rid, sent = new_id(render.id_prefix), set()
    async for changed in job.updates():
        choices = []
        for c in changed:
            if c.error:
                yield sse(ApiError(500, c.error, kind="server_error").body())
                yield sse("[DONE]")
                return
            text, entries = c.drain()
            final, first = c.finish_reason is not None, c.index not in sent
            if text or entries or final or first:
                choices.append(render.choice(c, text, entries, first=first, final=final))
                sent.add(c.index)
        if choices:
            yield sse(envelope(render.chunk_kind, rid, job.served.name, choices))
    if include_usage:
        total = sum(c.completion_tokens for c in job.choices)
        yield sse(envelope(render.chunk_kind, rid, job.served.name, [], usage(job.prompt_tokens, total)))
    yield sse("[DONE]")


def load_served(runs: list[str], checkpoint: str, device: str, dtype: str, weights: str) -> list[ServedModel]:
    """One ServedModel per run folder, named after it (the request's `model` field)."""
    from pathlib import Path

    from slmkit.api import load

    served: list[ServedModel] = []
    for run in runs:
        name = Path(run).resolve().name
        if any(s.name == name for s in served):
            raise UserError(f"two runs are named {name!r}: the model field could not tell them apart")
        served.append(ServedModel(name, load(run, device, dtype, checkpoint, weights)))
    return served

