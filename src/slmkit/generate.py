"""Autoregressive sampling: temperature, top-k, top-p, stop strings and the end-of-text token,
a KV cache, and text streamed as it is produced.

GPT-1 generates "until the [end] token is predicted or the maximum input size is reached"; here
the maximum is --max-new-tokens, and a sequence longer than the context slides its window
(the cache is then rebuilt from the tokens kept).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from slmkit.config import SEED_LIMIT, WEIGHT_FORMATS, show
from slmkit.errors import UserError
from slmkit.inference import DecodeStep, decoding_model
from slmkit.model import GPT
from slmkit.options import option
from slmkit.tokenizers import Tokenizer

# Below this temperature sampling is greedy: logits / 1e-45 overflows to inf (NaN probabilities),
# and any temperature this small already puts all the probability on the most likely token.
GREEDY_BELOW = 1e-5
MAX_NEW_TOKENS = 10**7
MAX_SAMPLES = 10**5


def _int_option(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"--{name} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise UserError(f"--{name} must be between {low:,} and {high:,}, got {show(value)}")


def _float_option(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"--{name} must be a finite number, got {show(value)}")
    return float(value)


@dataclass
class GenerationConfig:
    """How to sample; `slm generate`'s flags are generated from these fields, so their defaults are the
    CLI's and the API's alike. temperature 0 is greedy (always the most likely token), and so is any
    temperature below GREEDY_BELOW (1e-5), which would otherwise overflow the logits.

    top_k defaults to 200, nanoGPT's sampling default (as temperature 0.8 is): it trims only the long
    tail of a BPE vocabulary, where thousands of unlikely tokens together hold real probability and one
    draw from them can derail a sample, and it changes nothing for a character vocabulary (under 200).
    """

    max_new_tokens: int = option(500, "tokens to generate per sample", bounds=(0, MAX_NEW_TOKENS))
    temperature: float = option(0.8, "softmax temperature; 0 (or anything below 1e-5) = greedy")
    top_k: int = option(200, "sample among the k most likely tokens; 0 = off", bounds=(0, 2**62))
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens whose probability reaches p; 1 = off")
    stop: tuple[str, ...] = option((), "stop a sample at this string (repeatable; on the command line \\n and \\t "
                                       "mean newline and tab)")
    stop_at_eot: bool = option(True, "stop a sample at the end-of-text token (--no-eot-stop: go on past it)",
                               cli="--eot-stop")
    # Sample i uses seed + i; torch.Generator.manual_seed takes values below 2**64.
    seed: int | None = option(None, "random seed for reproducible samples", bounds=(0, SEED_LIMIT - 1))
    num_samples: int = option(1, "independent samples", bounds=(1, MAX_SAMPLES))
    use_cache: bool = option(True, "KV cache (--no-cache: recompute every position; slow, for comparison)",
                             cli="--cache")
    # Checked by slmkit.inference. A runtime flag: eval and score take --weights too.
    weights: str = option(
        "auto",
        "auto: the checkpoint's weights in --dtype; int8: weight-only int8 linears with bf16 activations (CPU only; "
        "faster generation at a small cost in loss, measured in the README)",
        choices=WEIGHT_FORMATS, runtime=True,
    )

    def validate(self) -> None:
        _int_option("max-new-tokens", self.max_new_tokens, *self._bounds("max_new_tokens"))
        if _float_option("temperature", self.temperature) < 0:
            raise UserError("--temperature must not be negative (0 = greedy)")
        _int_option("top-k", self.top_k, *self._bounds("top_k"))
        if not 0.0 < _float_option("top-p", self.top_p) <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {show(self.top_p)}")
        _int_option("num-samples", self.num_samples, *self._bounds("num_samples"))
        if self.seed is not None:
            _int_option("seed", self.seed, *self._bounds("seed"))
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise UserError(f"stop must be a list of strings, got {show(self.stop)}")
        if any(s == "" for s in self.stop):
            raise UserError("a stop string must not be empty")

    @classmethod
    def _bounds(cls, name: str) -> tuple[int, int]:
        """A field's bounds, as declared once in its metadata."""
        return next(f.metadata["bounds"] for f in fields(cls) if f.name == name)


def window_shift(block_size: int) -> int:
    """How far the window slides when a sequence outgrows the context: half of it, as llama.cpp's
    context shift discards half. With learned absolute positions every kept token moves, so its
    keys and values are computed again: a half slide re-runs one kept token per new token, a
    quarter slide three (their prefills were ~10% of shakespeare-char's decoding time)."""
    return max(1, block_size // 2)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the k most likely tokens, then the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False  # explicitly: a top_p below float32's smallest value rounds to 0 here
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token(logits: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> int:
    logits = logits.float().view(-1)
    top = float(logits.max())  # NaN if any logit is NaN
    if not math.isfinite(top):
        raise UserError("the model's output is not a finite number: its weights are corrupted or training diverged")
    if gen.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    ids = None
    if gen.top_k and gen.top_k < logits.numel():
        # Draw among the k largest only: the same distribution as masking the rest to -inf, but a
        # draw over 200 values instead of 50,257 (GPT-2's vocabulary: 0.77 ms a token on 2 cores).
        logits, ids = torch.topk(logits, gen.top_k)
    # Shifted so the largest logit is 0: dividing by a small temperature can then only push the
    # others towards -inf (probability 0), never overflow to +inf.
    logits = filter_logits((logits - top) / gen.temperature, 0, gen.top_p)
    probs = torch.softmax(logits, dim=-1)
    drawn = int(torch.multinomial(probs.cpu(), 1, generator=rng))
    return drawn if ids is None else int(ids[drawn])


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    gen: GenerationConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rng: torch.Generator | None = None,
    vocab_limit: int | None = None,
    eot_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. With the cache, the prompt is run once (prefill) and
    each later token costs one single-position step.

    The model sees the tokens from `start` on. When they no longer fit in the context, the window
    slides forward by half the context at once (`window_shift`) and the cache is rebuilt from the
    kept tokens: one prefill per block_size/2 new tokens instead of one per token. The uncached
    path uses the very same windows, so both give the same tokens. Single new tokens go through
    `DecodeStep` where the prepared model allows it.

    The weights are cast to `dtype` once (and prepacked on CPU) rather than autocast at each token.
    """
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token (or character)")
    device = torch.device(device)
    model = decoding_model(model, device, dtype, gen.weights)
    block = model.config.block_size
    shift = window_shift(block)
    seq = list(prompt_ids)
    start = max(0, len(seq) - block)
    # On CPU, attention over the cache runs in fp32 even for bf16 weights: for one query the fp32
    # kernel takes 13 us and the bf16 one 55 us (shakespeare-char, 200 cached tokens).
    cache = model.new_cache(torch.float32 if device.type == "cpu" else None) if gen.use_cache else None
    step = DecodeStep(model) if cache is not None and DecodeStep.fits(model) else None
    for _ in range(gen.max_new_tokens):
        if len(seq) - start > block:
            start = len(seq) - (block - shift)
            if cache is not None:
                cache.reset()
        fed = start + (cache.length if cache is not None else 0)
        if step is not None and fed == len(seq) - 1 and step.can_take(cache):
            logits = step(seq[-1], cache)[0].float()
        else:
            x = torch.tensor([seq[fed:]], dtype=torch.long, device=device)
            logits, _ = model(x, cache=cache, last_only=True)
            logits = logits[0, -1].float()
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = float("-inf")  # padded embedding rows are not tokens
        tid = next_token(logits, gen, rng)
        yield tid
        if gen.stop_at_eot and eot_id is not None and tid == eot_id:
            return
        seq.append(tid)


def generate_stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | None = None,
    gen: GenerationConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_ids: list[int] | None = None,
    sample_index: int = 0,
) -> Iterator[str]:
    """Yield the continuation as text pieces, as soon as they are complete characters.

    Stop strings end the sample and are not printed; text that might begin a stop string is
    held back until it is clear that it does not.
    """
    gen = gen or GenerationConfig()
    gen.validate()
    device = torch.device(device)
    ids = prompt_ids if prompt_ids is not None else tokenizer.encode(prompt or "")
    rng = None
    if gen.seed is not None:
        rng = torch.Generator().manual_seed(gen.seed + sample_index)
    eot = tokenizer.special.get("eot")
    text = TextStream(tokenizer, gen.stop)
    for tid in generate_ids(model, ids, gen, device, dtype, rng, tokenizer.vocab_size, eot):
        if gen.stop_at_eot and tid == eot:
            break
        piece = text.push(tid)
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail


class TextStream:
    """Token ids in, text out as soon as it is complete characters (`push`), cut at the first stop
    string, which is not part of the text. Text that might begin a stop string is held back until
    it is clear that it does not; `finish` returns what is left at the end."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.held = ""
        self.stopped = False

    def push(self, tid: int) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.push(tid)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [self.held.find(s) for s in self.stop if s in self.held]
        if hits:
            self.stopped = True
            out, self.held = self.held[: min(hits)], ""
            return out
        keep = 0 if final or not self.stop else self.longest_stop - 1
        cut = max(0, len(self.held) - keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | None = None,
    gen: GenerationConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_ids: list[int] | None = None,
) -> list[str]:
    """`num_samples` completed continuations (without the prompt)."""
    gen = gen or GenerationConfig()
    return [
        "".join(generate_stream(model, tokenizer, prompt, gen, device, dtype, prompt_ids, sample_index=i))
        for i in range(gen.num_samples)
    ]
