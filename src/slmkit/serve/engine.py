"""Continuous batching: one thread decodes every running sequence of a model together.

Decoding one sequence is bound by reading the weights (every token reads all of them), so eight
sequences decoding in one forward pass cost little more than one (measured in the README). The
engine keeps one KV-cache row per sequence (`SlotKVCache`) and works in iterations:

1. new sequences join at a token boundary: each one's prompt is run alone into a free row, and
   its first token is drawn from that;
2. a sequence whose window is full slides it as `slm generate` does (by half the context, the
   kept tokens run again into its row);
3. one batched step feeds every running sequence its last token and draws each one's next token
   with its own settings and random generator;
4. finished and cancelled sequences leave; the last row moves into the gap, so the running rows
   stay first and the step's keys are a view, never a copy.

Tokens go out as `Token` events through the `deliver` callback, once per iteration for all
sequences (the server hands them to its event loop). The engine knows nothing of text: stop
strings are the consumer's, who calls `cancel()` when one is reached.

All engines of a process run in one thread, the one that calls `EngineLoop.run()` (the server's
main thread; HTTP lives in another). Torch work from a second thread gets its own OpenMP team,
and on 2 cores the two teams contend: a shakespeare-char decode step took 3.4 ms from a second
thread against 1.4 ms from the thread that loaded the model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmkit.errors import UserError
from slmkit.generate import GenerationConfig, next_token, window_shift
from slmkit.inference import decoding_model
from slmkit.model import GPT, SlotKVCache


@dataclass
class Token:
    """One drawn token, with its log-probability under the model (before temperature, top-k and
    top-p) and, when asked for, the most likely alternatives as (id, logprob) pairs."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """The sequence is over. reason: "length" (max tokens), "stop" (end-of-text), "cancelled" or
    "error" (with a message)."""

    reason: str
    message: str = ""


@dataclass
class PromptLogprobs:
    """Each prompt token's log-probability given the tokens before it (None for the first)."""

    entries: list[Token]


Event = Token | Finished | PromptLogprobs


@dataclass(eq=False)
class Sequence:
    """One sequence to decode: a prompt and how to sample its continuation."""

    prompt_ids: list[int]
    gen: GenerationConfig
    tag: object = None  # the consumer's: which request and choice this is
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probabilities; k: the drawn token's and the k best
    prompt_logprobs: bool = False
    tokens: list[int] = field(default_factory=list)
    start: int = 0  # the first token inside the model's window
    generated: int = 0
    cancelled: bool = False
    rng: torch.Generator | None = None


class Engine:
    """A model decoding many sequences at once. `submit` and `cancel` from any thread; `iterate`
    runs in the EngineLoop's thread, and events arrive through `deliver(list of (sequence, event))`,
    called from that thread."""

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, weights: str, eot_id: int | None,
                 vocab_size: int, slots: int, deliver: Callable[[list[tuple[Sequence, Event]]], None],
                 wake: threading.Condition):
        self.model = decoding_model(model, device, dtype, weights)
        self.device = device
        self.block = model.config.block_size
        self.shift = window_shift(self.block)
        self.eot_id = eot_id
        self.vocab_size = vocab_size
        self.slots = slots
        # On CPU attention over the cache runs in fp32 even for bf16 weights (generate_ids explains).
        self.cache = SlotKVCache(model.config.n_layer, self.block, slots,
                                 torch.float32 if device.type == "cpu" else None)
        self.deliver = deliver
        self.wake = wake  # the loop's: shared by its engines
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] lives in cache row i
        self.outbox: list[tuple[Sequence, Event]] = []
        self.steps = 0  # batched steps so far, and the rows they fed: for /health and benchmarks
        self.rows_fed = 0

    # ------------------------------------------------------------------ the consumer's side

    def submit(self, seq: Sequence) -> None:
        seq.tokens = list(seq.prompt_ids)
        seq.start = max(0, len(seq.tokens) - self.block)
        if seq.seed is not None:
            seq.rng = torch.Generator().manual_seed(seq.seed)
        with self.wake:
            self.waiting.append(seq)
            self.wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` at the next token boundary and free its row (a stop string, a client gone)."""
        seq.cancelled = True
        with self.wake:
            self.wake.notify()

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting now; batched steps so far and the rows they fed (their
        ratio is the mean batch)."""
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps,
                "rows_fed": self.rows_fed}

    # ------------------------------------------------------------------ the loop's thread

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def iterate(self) -> None:
        """One iteration: waiting sequences join, full windows slide, one batched step."""
        with self.wake:
            joining = []
            while self.waiting and len(self.running) + len(joining) < self.slots:
                joining.append(self.waiting.popleft())
        try:
            with torch.inference_mode():
                self._iteration(joining)
        except Exception as exc:  # noqa: BLE001 - one bad step must not take the server down
            self._fail_all(joining, exc)
        self._flush()

    def shut(self) -> None:
        """The loop is stopping: every sequence still here ends, cancelled."""
        with self.wake:
            left = [*self.running, *self.waiting]
            self.running.clear()
            self.waiting.clear()
        for seq in left:
            self.outbox.append((seq, Finished("cancelled", "the server is shutting down")))
        self._flush()

    def _iteration(self, joining: list[Sequence]) -> None:
        for seq in joining:
            if seq.cancelled:
                self.outbox.append((seq, Finished("cancelled")))
                continue
            self.running.append(seq)
            self._join(seq, len(self.running) - 1)
        self._retire()
        for row, seq in enumerate(self.running):
            if len(seq.tokens) - seq.start > self.block:
                self._slide(seq, row)
        if self.running:
            self._step()
            self._retire()

    def _join(self, seq: Sequence, row: int) -> None:
        self.cache.clear(row)
        self.cache.prefill(row)
        window = seq.tokens[seq.start:]
        x = torch.tensor([window], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, cache=self.cache, last_only=not seq.prompt_logprobs)
        logits = logits[0].float()
        if seq.prompt_logprobs:
            self.outbox.append((seq, PromptLogprobs(self._prompt_entries(seq, window, logits))))
        self._draw(seq, logits[-1])

    def _slide(self, seq: Sequence, row: int) -> None:
        """The window is full: keep its last half and run them again into the row; the
        batched step then feeds the pending token, as for any sequence."""
        seq.start = len(seq.tokens) - (self.block - self.shift)
        self.cache.clear(row)
        self.cache.prefill(row)
        x = torch.tensor([seq.tokens[seq.start : -1]], dtype=torch.long, device=self.device)
        self.model(x, cache=self.cache, last_only=True)

    def _step(self) -> None:
        x = torch.tensor([[seq.tokens[-1]] for seq in self.running], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, cache=self.cache, last_only=True)
        logits = logits[:, -1].float()
        self.steps += 1
        self.rows_fed += len(self.running)
        for row, seq in enumerate(self.running):
            if not seq.cancelled:
                self._draw(seq, logits[row])

    def _draw(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Draw `seq`'s next token from its logits row and tell the consumer."""
        if self.vocab_size < logits.numel():
            logits = logits.clone()
            logits[self.vocab_size :] = float("-inf")  # padded embedding rows are not tokens
        try:
            tid = next_token(logits, seq.gen, seq.rng)
        except UserError as exc:  # the model's output is not finite
            self._finish(seq, Finished("error", str(exc)))
            return
        event = Token(tid)
        if seq.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            event.logprob = float(logp[tid])
            if seq.logprobs > 0:
                values, ids = torch.topk(logp, min(seq.logprobs, self.vocab_size))
                event.top = [(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
        seq.tokens.append(tid)
        seq.generated += 1
        self.outbox.append((seq, event))
        if seq.gen.stop_at_eot and tid == self.eot_id:
            self._finish(seq, Finished("stop"))
        elif seq.generated >= seq.gen.max_new_tokens:
            self._finish(seq, Finished("length"))

    def _prompt_entries(self, seq: Sequence, window: list[int], logits: torch.Tensor) -> list[Token]:
        logp = torch.log_softmax(logits[:, : self.vocab_size], dim=-1)
        entries = [Token(window[0])]
        for pos, tid in enumerate(window[1:]):
            entry = Token(tid, float(logp[pos, tid]))
            if seq.logprobs:
                values, ids = torch.topk(logp[pos], min(seq.logprobs, self.vocab_size))
                entry.top = [(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
            entries.append(entry)
        return entries

    def _finish(self, seq: Sequence, event: Finished) -> None:
        seq.cancelled = True
        self.outbox.append((seq, event))

    def _retire(self) -> None:
        """Drop the sequences that are over; the last running row fills each gap."""
        row = 0
        while row < len(self.running):
            seq = self.running[row]
            if not seq.cancelled:
                row += 1
                continue
            last = len(self.running) - 1
            if row != last:
                self.cache.move(last, row)
            self.running[row] = self.running[last]
            self.running.pop()
            self.cache.clear(last)

    def _fail_all(self, joining: list[Sequence], exc: Exception) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        for seq in {*self.running, *joining}:
            if not seq.cancelled:
                self._finish(seq, Finished("error", message))
        self.running.clear()
        for row in range(self.slots):
            self.cache.clear(row)

    def _flush(self) -> None:
        if self.outbox:
            batch, self.outbox = self.outbox, []
            self.deliver(batch)


class EngineLoop:
    """Runs its engines, round robin, in the thread that calls `run()` until `stop()`."""

    def __init__(self) -> None:
        self.wake = threading.Condition()
        self.engines: list[Engine] = []
        self.stopping = False

    def engine(self, *args, **kwargs) -> Engine:
        """A new Engine (Engine's arguments, without `wake`) run by this loop."""
        engine = Engine(*args, **kwargs, wake=self.wake)
        self.engines.append(engine)
        return engine

    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Decode until `stop()`, or until `alive()` turns false (checked while idle)."""
        try:
            while True:
                with self.wake:
                    while not self.stopping and not any(e.has_work() for e in self.engines):
                        if not alive():
                            return
                        self.wake.wait(timeout=0.5)
                    if self.stopping:
                        return
                for engine in self.engines:
                    if engine.has_work():
                        engine.iterate()
        finally:
            for engine in self.engines:
                engine.shut()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def run_in_thread(self) -> threading.Thread:
        """Run in a new thread (for library use and tests; a server runs the loop in its main thread)."""
        thread = threading.Thread(target=self.run, name="slmkit-engines", daemon=True)
        thread.start()
        return thread
