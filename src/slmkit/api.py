"""The Python API over a trained model: load a run, generate (streaming or not), score, evaluate.

    lm = slmkit.load("runs/demo")
    for piece in lm.generate_stream("ROMEO:", max_new_tokens=100):
        print(piece, end="", flush=True)
    lm.score("To be, or not to be").perplexity

Generation options are GenerationConfig's fields, with the defaults `slm generate` shows in its --help.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from slmkit.checkpoint import Checkpoint, load_model
from slmkit.errors import UserError, show
from slmkit.evaluation import LMScore, score_tokens, token_logprobs
from slmkit.generate import GenerationConfig, generate_stream, generate_text
from slmkit.inference import decoding_model
from slmkit.model import GPT
from slmkit.runtime import resolve_device, resolve_dtype
from slmkit.tokenizers import Tokenizer

# Windows per forward pass when scoring: beyond this a typo, not a batch.
MAX_SCORE_BATCH = 2**16


class LanguageModel:
    """A GPT together with its tokenizer, device and precision."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, checkpoint: Checkpoint | None = None,
                 device: str = "auto", dtype: str = "auto", weights: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        self.weights = weights
        if weights != "auto":
            decoding_model(self.model, self.device, self.dtype, weights)  # an unusable format fails here
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint

    @property
    def config(self):
        return self.model.config

    def _gen_config(self, options: dict) -> GenerationConfig:
        """The options (GenerationConfig's fields, whose defaults `slm generate` shares) checked now,
        when generate() is called, not at the first token drawn."""
        known = [f.name for f in fields(GenerationConfig)]
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise UserError(f"unknown generation option {unknown[0]!r}; known: {', '.join(known)}")
        stop = options.get("stop")
        if isinstance(stop, str | list):
            # stop="\n\n" is one stop string, not a tuple of its characters.
            options = {**options, "stop": (stop,) if isinstance(stop, str) else tuple(stop)}
        gen = replace(GenerationConfig(weights=self.weights), **options)
        gen.validate()
        return gen

    def _scoring_model(self) -> GPT:
        """Scores use the model as trained (autocast), unless int8 weights were asked for."""
        if self.weights == "auto":
            return self.model
        return decoding_model(self.model, self.device, self.dtype, self.weights)

    def generate_stream(self, prompt: str = "", **options) -> Iterator[str]:
        # Checked before the generator is returned, so a bad option fails at the call.
        gen = self._gen_config(options)
        ids = self._prompt_ids(prompt)
        return generate_stream(self.model, self.tokenizer, gen=gen, device=self.device, dtype=self.dtype,
                               prompt_ids=ids)

    def generate(self, prompt: str = "", **options) -> list[str]:
        gen = self._gen_config(options)
        return generate_text(self.model, self.tokenizer, gen=gen, device=self.device, dtype=self.dtype,
                             prompt_ids=self._prompt_ids(prompt))

    def _prompt_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise UserError(f"the prompt must be a string, got {show(prompt)}")
        if prompt:
            return self.tokenizer.encode(prompt)
        # An empty prompt starts from end-of-text (BPE) or a newline (characters).
        if "eot" in self.tokenizer.special:
            return [self.tokenizer.special["eot"]]
        return self.tokenizer.encode("\n")

    def score_ids(self, ids: list[int], chars: int, batch_size: int = 8) -> tuple[LMScore, np.ndarray]:
        _check_batch_size(batch_size)
        ids = self.tokenizer.check_ids(ids)
        if len(ids) < 2:
            raise UserError("nothing to score: the text gives fewer than 2 tokens (the first one is only context)")
        tokens = np.asarray(ids, dtype=np.int64)
        logp = token_logprobs(self._scoring_model(), tokens, batch_size, self.device, self.dtype)
        return LMScore(nll=float(-logp.sum()), tokens=int(logp.size), chars=chars), logp

    def score(self, text: str, prepend_eot: bool = True) -> LMScore:
        return self.score_text(text, prepend_eot)[0]

    def score_text(self, text: str, prepend_eot: bool = True) -> tuple[LMScore, list[int], np.ndarray]:
        """Log-likelihood of `text`. With an end-of-text token, it conditions the first token, so
        every token of the text is scored; without one the first token is context only."""
        if not isinstance(text, str):
            raise UserError(f"the text to score must be a string, got {show(text)}")
        if not text:
            raise UserError("the text to score is empty")
        ids = self.tokenizer.encode(text)
        eot = self.tokenizer.special.get("eot")
        if prepend_eot and eot is not None:
            ids = [eot, *ids]
        chars = len(text) if (prepend_eot and eot is not None) else len(text) - len(self.tokenizer.decode(ids[:1]))
        s, logp = self.score_ids(ids, chars)
        return s, ids, logp

    def evaluate_tokens(self, tokens: np.ndarray, chars: int, batch_size: int = 16) -> LMScore:
        _check_batch_size(batch_size)
        if len(tokens) < 2:
            raise UserError(f"nothing to evaluate: the split holds {len(tokens)} token(s)")
        return score_tokens(self._scoring_model(), tokens, chars, batch_size, self.device, self.dtype)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_SCORE_BATCH:
        raise UserError(f"--batch-size must be an integer from 1 to {MAX_SCORE_BATCH:,}, got {show(batch_size)}")


def load(
    run_or_checkpoint: str | Path, device: str = "auto", dtype: str = "auto", which: str = "best",
    weights: str = "auto",
) -> LanguageModel:
    """A trained model, ready to generate and score. weights="int8": weight-only int8 (CPU)."""
    model, tokenizer, ckpt = load_model(run_or_checkpoint, "cpu", which)
    return LanguageModel(model, tokenizer, ckpt, device, dtype, weights)

