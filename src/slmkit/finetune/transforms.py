"""GPT-1's input transformations: every task becomes one or more token sequences ending in `e`.

    classification   s text e
    entailment       s premise $ hypothesis e
    similarity       s A $ B e   and   s B $ A e        (two sequences; their states at e are added)
    multiple choice  s context [question] $ answer_k e  (one sequence per answer)

Truncation, when a sequence is longer than the context (`max_len` tokens, specials included):
- classification keeps the start of the text (drops its end);
- entailment keeps the whole hypothesis and the end of the premise (drops the premise's start);
  only a hypothesis longer than the context on its own loses its end;
- multiple choice keeps the end of the context (so the question, which follows it, survives) and
  every whole answer; the context is cut by the same amount for every answer; an answer too long
  on its own loses its end;
- similarity drops tokens from the end of the longer sentence (from both when equally long), so
  that both orders hold the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slmkit.errors import UserError
from slmkit.finetune.tasks import Example, TaskSpec
from slmkit.tokenizers import Tokenizer

ROLES = ("start", "delim", "extract")


@dataclass
class Encoded:
    """One example as token sequences: 1 (classification, entailment), 2 (similarity) or k (choices)."""

    seqs: list[list[int]]
    label: int | float | None
    truncated: bool


def special_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    missing = [r for r in ROLES if r not in tokenizer.special]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token(s); add them with add_special_tokens()")
    return tokenizer.special["start"], tokenizer.special["delim"], tokenizer.special["extract"]


def _fit_pair_keep_end(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Keep `second` whole and the end of `first`; `second` loses its end only if it alone is too long."""
    if len(first) + len(second) <= budget:
        return first, second, False
    if len(second) >= budget:
        return [], second[:budget], True
    keep = budget - len(second)
    return first[len(first) - keep :] if keep else [], second, True


def _fit_symmetric(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Shorten the longer of a and b from its end (both when tied), the same whatever their order."""
    if len(a) + len(b) <= budget:
        return a, b, False
    la, lb = len(a), len(b)
    shorter = min(la, lb)
    if budget - shorter >= shorter:  # cutting only the longer one is enough
        cut_long = budget - shorter
        na, nb = (cut_long, lb) if la > lb else (la, cut_long)
    else:  # both down to half the budget (equal lengths, so symmetric)
        half = budget // 2
        na, nb = min(la, half), min(lb, half)
    return a[:na], b[:nb], True


def encode_example(spec: TaskSpec, tokenizer: Tokenizer, ex: Example, max_len: int,
                   cache: dict[str, list[int]] | None = None) -> Encoded:
    s, d, e = special_ids(tokenizer)
    if max_len < 5:
        raise UserError(f"max_len {max_len} is too short for the special tokens")

    def enc(text: str) -> list[int]:
        if cache is None:
            return tokenizer.encode(text)
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    fam = spec.family
    if fam == "classification":
        text = enc(ex.segments[0])
        budget = max_len - 2
        return Encoded([[s, *text[:budget], e]], ex.label, len(text) > budget)
    if fam == "entailment":
        prem, hyp, cut = _fit_pair_keep_end(enc(ex.segments[0]), enc(ex.segments[1]), max_len - 3)
        return Encoded([[s, *prem, d, *hyp, e]], ex.label, cut)
    if fam == "similarity":
        a, b, cut = _fit_symmetric(enc(ex.segments[0]), enc(ex.segments[1]), max_len - 3)
        return Encoded([[s, *a, d, *b, e], [s, *b, d, *a, e]], ex.label, cut)
    # multiple choice: the context is shared, so cut it once for the longest answer.
    context = enc(" ".join(ex.segments))
    answers = [enc(a) for a in ex.choices]
    budget = max_len - 3
    longest = max(len(a) for a in answers)
    cut = len(context) + longest > budget
    if cut:
        keep = max(0, budget - longest)
        context = context[len(context) - keep :] if keep else []
    seqs = [[s, *context, d, *a[: budget - len(context)], e] for a in answers]
    return Encoded(seqs, ex.label, cut)


def encode_examples(spec: TaskSpec, tokenizer: Tokenizer, examples: list[Example],
                    max_len: int) -> tuple[list[Encoded], int]:
    """All examples encoded, and how many were truncated."""
    cache: dict[str, list[int]] = {}
    # Encode every distinct text in one batched call (the BPE tokenizers parallelise it).
    texts = sorted({t for ex in examples for t in ([" ".join(ex.segments)] if spec.family == "multiple_choice"
                                                    else ex.segments) + ex.choices})
    for t, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
        cache[t] = ids
    out = [encode_example(spec, tokenizer, ex, max_len, cache) for ex in examples]
    return out, sum(o.truncated for o in out)


@dataclass
class Batch:
    """Right-padded sequences: ids [B, K, T]; lengths [B, K] (0 = a padding choice); labels [B]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor | None

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.lengths.to(device),
                     None if self.labels is None else self.labels.to(device))


def collate(items: list[Encoded], pad_id: int = 0, regression: bool = False) -> Batch:
    """Pad to the longest sequence and the largest number of choices in the batch.

    Padding goes on the right: with causal attention no real token ever attends to a pad, so the
    state at `e` is exactly that of the unpadded sequence and no attention mask is needed; pads are
    masked out of the LM loss by their length, and padding choices by a length of 0.
    """
    B = len(items)
    K = max(len(it.seqs) for it in items)
    T = max(len(s) for it in items for s in it.seqs)
    ids = np.full((B, K, T), pad_id, dtype=np.int64)
    lengths = np.zeros((B, K), dtype=np.int64)
    for i, it in enumerate(items):
        for k, seq in enumerate(it.seqs):
            ids[i, k, : len(seq)] = seq
            lengths[i, k] = len(seq)
    labels = None
    if all(it.label is not None for it in items):
        dtype = torch.float32 if regression else torch.long
        labels = torch.tensor([it.label for it in items], dtype=dtype)
    return Batch(torch.from_numpy(ids), torch.from_numpy(lengths), labels)
