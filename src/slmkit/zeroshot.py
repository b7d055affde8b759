"""Zero-shot task scores from a pre-trained language model alone (GPT-1 §5, "zero-shot behaviours").

No training: each task is a scoring rule over the model's log-probabilities.

    sst2        text + " very", then log P(" positive") vs log P(" negative")     (paper)
    cola        average token log-probability of the sentence, thresholded     (paper; threshold from --calibrate)
    storycloze, multiple_choice
                the answer with the highest average token log-probability after the context  (paper)
    winograd    substitute each option for "_"; the higher average log-probability of the rest  (paper)
    rte, mrpc, sick, stsb
                NOT from the paper: "A\\nQuestion: B True or False?\\nAnswer:" and log P(" True") - log P(" False")

A candidate's tokens are those of the full string after the prefix it shares with the context, so each
tokenizer's own convention (GPT-2's leading-space words, GPT-1's lower-cased `</w>` words, characters)
is respected. All candidates of one example share their context: it goes through the model once
(left-padded, with its keys and values kept), and the candidates follow it in one more forward pass.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.errors import UserError
from slmkit.finetune import metrics as M
from slmkit.finetune.tasks import BAD_ROW, get_task, parse_rows, read_examples, read_text, spec_from_flags
from slmkit.model import attend
from slmkit.runtime import autocast

TASKS = ("sst2", "cola", "storycloze", "multiple_choice", "winograd", "rte", "mrpc", "sick", "stsb")
NOT_FROM_PAPER = ("rte", "mrpc", "sick", "stsb")
MAIN_METRIC = {"cola": "mcc", "stsb": "pearson", "sick": "pearson"}
MAIN_METRIC.update({t: "accuracy" for t in TASKS if t not in MAIN_METRIC})
RULES = {
    "sst2": 'text + " very"; log P(" positive") vs log P(" negative") (GPT-1 section 5)',
    "cola": "average token log-probability of the sentence above a threshold chosen on --calibrate (GPT-1 section 5)",
    "storycloze": "the ending with the highest average token log-probability after the story (GPT-1 section 5)",
    "multiple_choice": "the answer with the highest average token log-probability after the context (GPT-1 section 5)",
    "winograd": 'each option in place of "_"; the higher average log-probability of the rest (GPT-1 section 5)',
    "rte": 'NOT from the paper: "premise\\nQuestion: hypothesis True or False?\\nAnswer:", " True" vs " False"',
    "mrpc": 'NOT from the paper: "A\\nQuestion: B Same meaning? True or False?\\nAnswer:", " True" vs " False"',
    "sick": 'NOT from the paper: log P(" True") - log P(" False") after the mrpc prompt, correlated with relatedness',
    "stsb": 'NOT from the paper: log P(" True") - log P(" False") after the mrpc prompt, correlated with the score',
}


# ----------------------------------------------------------------------------- batched scoring


class _PrefixCache:
    """Duck-typed KV cache for GPT.hidden_states: row-wise positions, an explicit attention mask, and
    the context's keys and values kept from the first pass for the candidates' pass."""

    def __init__(self, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor] | None = None):
        self.pos, self.mask, self.past = positions, mask, past
        self.kv: list[torch.Tensor] = []

    def positions(self, batch: int, T: int, device: torch.device) -> torch.Tensor:
        return self.pos

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        new = qkv[:, :, 1:]
        keys = new if self.past is None else torch.cat([self.past[layer].to(new.dtype), new], dim=1)
        self.kv.append(new)
        return attend(qkv, keys, self.mask)

    def advance(self, T: int) -> None:
        pass


@dataclass
class Group:
    """One context and the candidate continuations scored after it (token ids)."""

    context: list[int]
    candidates: list[list[int]]


@torch.no_grad()
def score_groups(model, groups: list[Group], batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[list[np.ndarray]]:
    """log P(token | everything before it) for every token of every candidate, per group.

    Contexts longer than the model's context are cut from the left (the candidates are kept whole)."""
    device = torch.device(device)
    block = model.config.block_size
    groups = [_fit(g, block) for g in groups]
    out: list[list[np.ndarray]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda i: len(groups[i].context))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, logps in zip(idx, _score_batch(model, [groups[i] for i in idx], device, dtype), strict=True):
            out[i] = logps
    model.train(was_training)
    return out


def _fit(g: Group, block: int) -> Group:
    if not g.context or any(not c for c in g.candidates):
        raise ValueError("every group needs a context and non-empty candidates")
    cands = [c[: block - 1] for c in g.candidates]
    room = block - max(len(c) for c in cands)
    return Group(g.context[-room:], cands)


def _score_batch(model, groups: list[Group], device: torch.device, dtype: torch.dtype) -> list[list[np.ndarray]]:
    B = len(groups)
    P = max(len(g.context) for g in groups)
    pads = torch.tensor([P - len(g.context) for g in groups], device=device)
    ctx = torch.zeros(B, P, dtype=torch.long)
    for r, g in enumerate(groups):
        ctx[r, P - len(g.context):] = torch.tensor(g.context)
    j = torch.arange(P, device=device)
    pos = (j[None, :] - pads[:, None]).clamp(min=0)
    # Causal, never a pad key; a pad query sees itself only (no row of -inf, no NaN).
    mask = (j[None, :] <= j[:, None])[None] & (j[None, None, :] >= pads[:, None, None])
    mask = (mask | torch.eye(P, dtype=torch.bool, device=device)[None]).unsqueeze(1)
    first = _PrefixCache(pos, mask)
    with autocast(device, dtype):
        h_ctx = model.hidden_states(ctx.to(device), first)[:, -1]  # predicts each candidate's first token

    # Second pass: a group's candidates side by side in one row, each seeing the context and its own
    # earlier tokens only, each starting at the position after the context.
    W = max(sum(len(c) for c in g.candidates) for g in groups)
    cand = torch.zeros(B, W, dtype=torch.long)
    seg = torch.full((B, W), -1, dtype=torch.long)
    off = torch.zeros(B, W, dtype=torch.long)
    for r, g in enumerate(groups):
        at = 0
        for k, c in enumerate(g.candidates):
            cand[r, at:at + len(c)] = torch.tensor(c)
            seg[r, at:at + len(c)] = k
            off[r, at:at + len(c)] = torch.arange(len(c))
            at += len(c)
    cand, seg, off = cand.to(device), seg.to(device), off.to(device)
    lens = torch.tensor([len(g.context) for g in groups], device=device)
    pos2 = (lens[:, None] + off).clamp(max=model.config.block_size - 1)
    jw = torch.arange(W, device=device)
    past_mask = (j[None, :] >= pads[:, None])[:, None, :].expand(-1, W, -1)
    own = (seg[:, :, None] == seg[:, None, :]) & (jw[None, None, :] <= jw[None, :, None]) & (seg[:, :, None] >= 0)
    mask2 = torch.cat([past_mask, own], dim=2).unsqueeze(1)
    second = _PrefixCache(pos2, mask2, first.kv)
    real = seg >= 0
    # The state that predicts each candidate token: the context's last for a first token, else the
    # state of the token before it in the same candidate (index c in [h_ctx, h_cand]).
    src = torch.where(off == 0, torch.zeros_like(jw)[None, :], jw[None, :].expand(B, -1))
    with autocast(device, dtype):
        h_cand = model.hidden_states(cand, second)
        states = torch.cat([h_ctx[:, None], h_cand], dim=1)
        h = states.gather(1, src[..., None].expand(-1, -1, states.size(-1)))[real]
        logits = model.lm_head(h)
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, cand[real][:, None]).squeeze(-1).cpu().double().numpy()
    out: list[list[np.ndarray]] = []
    at = 0
    for g in groups:
        row = []
        for c in g.candidates:
            row.append(picked[at:at + len(c)])
            at += len(c)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- candidates from text


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _start(tokenizer) -> list[int]:
    eot = tokenizer.special.get("eot")
    return [eot] if eot is not None else []


def split_group(tokenizer, context: str, continuations: list[str]) -> Group:
    """Encode context + each continuation whole; the candidates are the tokens after the prefix they
    all share with the context's own encoding. Raises UserError when a text cannot be encoded."""
    start = _start(tokenizer)
    ctx = start + tokenizer.encode(context)
    fulls = [start + tokenizer.encode(context + c) for c in continuations]
    k = min(common_prefix(ctx, f) for f in fulls)
    k = min([k, *(len(f) - 1 for f in fulls)])
    if k < 1:
        raise UserError(f"the context {context[:40]!r} gives no token before its continuation")
    return Group(fulls[0][:k], [f[k:] for f in fulls])


def check_words(tokenizer, words: list[str]) -> None:
    """The answer words must be encodable by the run's tokenizer (a char vocabulary may lack letters)."""
    for w in words:
        try:
            ids = tokenizer.encode(w)
        except UserError as exc:
            raise UserError(f"the run's tokenizer cannot encode the answer word {w!r}: {exc}") from None
        if not ids:
            raise UserError(f"the run's tokenizer encodes the answer word {w!r} as no tokens")


# ----------------------------------------------------------------------------- examples of each task


@dataclass
class Item:
    """One example: how to build its group, and its gold label (class, choice index or score)."""

    make: Callable[[], Group]
    gold: float
    line: int


@dataclass
class Loaded:
    items: list[Item]
    source: str
    malformed: int = 0
    notes: list[str] = field(default_factory=list)


def _read_jsonl(path: str | Path, check: Callable[[dict], str | None]) -> tuple[list[tuple[int, dict]], list[str]]:
    text, source = read_text(path)
    rows, bad = [], []
    for i, row in parse_rows(text, "jsonl", source):
        problem = row.get(BAD_ROW) or check(row)
        if problem:
            bad.append(f"{path}:{i}: {problem}")
        else:
            rows.append((i, row))
    total = len(rows) + len(bad)
    if not rows or len(bad) > 0.5 * total:
        first = f"; first: {bad[0]}" if bad else ""
        raise UserError(f"{path}: {len(bad)} of {total} rows do not fit the zero-shot format{first}")
    return rows, bad


def _check_mc(row: dict) -> str | None:
    ctx, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        return 'needs "context": a non-empty string'
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        return 'needs "choices": a list of at least two non-empty strings'
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        return f'"label" must be a choice index from 0 to {len(choices) - 1}, got {label!r}'
    return None


def _check_winograd(row: dict) -> str | None:
    s, options, label = row.get("sentence"), row.get("options"), row.get("label")
    if not isinstance(s, str) or s.count("_") != 1:
        return 'needs "sentence" with exactly one "_" where the pronoun was'
    if not isinstance(options, list) or len(options) != 2 or not all(isinstance(o, str) and o.strip() for o in options):
        return 'needs "options": a list of two non-empty strings'
    if isinstance(label, bool) or label not in (0, 1):
        return f'"label" must be 0 or 1, got {label!r}'
    if not s.split("_", 1)[1].strip():
        return 'nothing follows "_" to score'
    return None


def _prompt(a: str, b: str, task: str) -> str:
    if task == "rte":
        return f"{a}\nQuestion: {b} True or False?\nAnswer:"
    return f"{a}\nQuestion: {b} Same meaning? True or False?\nAnswer:"


def load_items(task: str, path: str | Path, tokenizer) -> Loaded:
    """The task file as zero-shot items (no tokenization yet)."""
    if task not in TASKS:
        raise UserError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)}")
    tok = tokenizer
    if task in ("multiple_choice", "winograd"):
        rows, bad = _read_jsonl(path, _check_mc if task == "multiple_choice" else _check_winograd)
        items = []
        for line, row in rows:
            if task == "multiple_choice":
                ctx, choices = row["context"].strip(), [" " + c.strip() for c in row["choices"]]
                items.append(Item(lambda c=ctx, ch=choices: split_group(tok, c, ch), row["label"], line))
            else:
                left, right = row["sentence"].split("_", 1)
                items.append(Item(lambda a=left, b=right, o=row["options"]: _winograd_group(tok, a, b, o),
                                  row["label"], line))
        return Loaded(items, str(path), len(bad), [f"skipped {len(bad)} malformed row(s): {bad[0]}"] if bad else [])
    if task == "sick":
        spec = spec_from_flags("sick", "similarity", "tsv", "sentence_A,sentence_B", "relatedness_score",
                               regression="1,5", metric="pearson,spearman")
    else:
        spec = get_task(task)
    read = read_examples(spec, path)
    items = []
    for ex in read.examples:
        segs = [s.strip() for s in ex.segments]
        if task == "sst2":
            make = lambda t=segs[0]: split_group(tok, t + " very", [" positive", " negative"])  # noqa: E731
        elif task == "cola":
            make = lambda t=segs[0]: _sentence_group(tok, t)  # noqa: E731
        elif task == "storycloze":
            make = lambda t=segs[0], ch=[" " + c for c in ex.choices]: split_group(tok, t, ch)  # noqa: E731
        else:
            make = lambda a=segs[0], b=segs[1]: split_group(tok, _prompt(a, b, task), [" True", " False"])  # noqa: E731
        items.append(Item(make, ex.label, ex.line))
    return Loaded(items, read.source, len(read.bad), [read.report()] if read.bad else [])


def _sentence_group(tok, text: str) -> Group:
    ids = _start(tok) + tok.encode(text)
    if len(ids) < 2:
        raise UserError("the sentence gives fewer than 2 tokens")
    return Group(ids[:1], [ids[1:]])


def _winograd_group(tok, left: str, right: str, options: list[str]) -> list[Group]:
    out = []
    for o in options:
        g = split_group(tok, left + o.strip(), [right])
        out.append(g)
    return out


# ----------------------------------------------------------------------------- the rules


@dataclass
class ZeroShotResult:
    task: str
    rule: str
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    examples: int
    skipped: int
    malformed: int
    threshold: float | None = None
    calibration: dict[str, Any] | None = None
    per_example: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        main = next(iter(self.metrics))
        rest = "  ".join(f"{k} {v:.4f}" for k, v in list(self.metrics.items())[1:])
        base = "  ".join(f"{name} {b[main]:.4f}" for name, b in self.baselines.items())
        thr = f"; threshold {self.threshold:.4f} (from --calibrate)" if self.threshold is not None else ""
        skip = f", {self.skipped} skipped (not encodable)" if self.skipped else ""
        note = " [rule not from the paper]" if self.task in NOT_FROM_PAPER else ""
        return (f"{self.task} zero-shot: {main} {self.metrics[main]:.4f}{'  ' + rest if rest else ''}  "
                f"(baselines: {base}){thr}; {self.examples} examples{skip}{note}")


def _build(loaded: Loaded, task: str) -> tuple[list[Group], list[int], list[Item], int]:
    """Groups (winograd: two per item), the item of each group, the scored items, and the skipped count."""
    groups, owner, kept, skipped = [], [], [], 0
    for item in loaded.items:
        try:
            made = item.make()
        except UserError:
            skipped += 1  # e.g. a character outside a char model's vocabulary
            continue
        made = made if isinstance(made, list) else [made]
        for g in made:
            groups.append(g)
            owner.append(len(kept))
        kept.append(item)
    if not kept:
        raise UserError(f"{loaded.source}: no example of task {task} can be encoded by the run's tokenizer")
    return groups, owner, kept, skipped


def best_threshold(scores: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """The threshold t (predict 1 when score > t) with the highest MCC on (scores, gold): midpoints
    between consecutive distinct scores, and one below all of them. Ties: the lowest t."""
    s = np.unique(scores)
    cands = np.r_[s[0] - 1.0, (s[:-1] + s[1:]) / 2] if len(s) > 1 else np.array([s[0] - 1.0])
    best_t, best_m = float(cands[0]), -2.0
    for t in cands:
        m = M.mcc((scores > t).astype(int), gold)
        if m > best_m + 1e-12:
            best_t, best_m = float(t), m
    return best_t, best_m


def _baselines(task: str, gold: np.ndarray, n_choices: list[int], metrics: list[str]) -> dict[str, dict[str, float]]:
    if task in ("stsb", "sick"):
        return {"random": dict.fromkeys(metrics, 0.0), "majority": dict.fromkeys(metrics, 0.0)}
    values, counts = np.unique(gold, return_counts=True)
    majority = np.full_like(gold, values[np.argmax(counts)])
    if task == "cola":
        return {"random": {"mcc": 0.0, "accuracy": 0.5},
                "majority": {"mcc": 0.0, "accuracy": M.accuracy(majority, gold)}}
    out = {"random": {"accuracy": float(np.mean([1 / k for k in n_choices]))},
           "majority": {"accuracy": M.accuracy(majority, gold)}}
    if "f1" in metrics:
        out["random"]["f1"] = float(2 * np.mean(gold == 1) / (2 * np.mean(gold == 1) + 1)) if len(gold) else 0.0
        out["majority"]["f1"] = M.f1(majority, gold)
    return out


def check_task(task: str, calibrate: str | Path | None, flag: str = "--calibrate") -> None:
    if task not in TASKS:
        raise UserError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)}")
    if task == "cola" and not calibrate:
        raise UserError(f"cola needs {flag} FILE: a labelled CoLA file on which the threshold is chosen "
                        "(e.g. ../shared/data/tasks/cola/train.tsv)")


def check_answer_words(task: str, tok) -> None:
    if task == "sst2":
        check_words(tok, [" very", " positive", " negative"])
    elif task in NOT_FROM_PAPER:
        check_words(tok, [" True", " False", "Question:", "Answer:"])


@dataclass
class Prepared:
    """A task file encoded once: its groups, the item owning each group, the kept items."""

    task: str
    loaded: Loaded
    groups: list[Group]
    owner: list[int]
    kept: list[Item]
    skipped: int

    @property
    def gold(self) -> np.ndarray:
        return np.array([it.gold for it in self.kept])


def prepare_task(task: str, path: str | Path, tokenizer, limit: int = 0) -> Prepared:
    """Read and encode a task file; `limit` > 0 keeps its first `limit` examples."""
    loaded = load_items(task, path, tokenizer)
    if limit:
        loaded.items = loaded.items[:limit]
    return Prepared(task, loaded, *_build(loaded, task))


def prepared_scores(model, prep: Prepared, batch_size: int, device, dtype) -> list[list[float]]:
    """Per kept item, the score of each candidate (sst2, rte...: summed log-probabilities; multiple choice,
    winograd and cola: the average per token)."""
    logps = score_groups(model, prep.groups, batch_size, device, dtype)
    scores: list[list[float]] = [[] for _ in prep.kept]
    average = prep.task in ("cola", "storycloze", "multiple_choice", "winograd")
    for i, cand_logps in zip(prep.owner, logps, strict=True):
        for lp in cand_logps:
            scores[i].append(float(lp.mean() if average else lp.sum()))
    return scores


def rule_metrics(task: str, scores: list[list[float]], gold: np.ndarray,
                 threshold: float | None = None) -> tuple[dict[str, float], np.ndarray]:
    """The task's metrics from its candidates' scores, and the predictions."""
    if task == "cola":
        pred = (np.array([s[0] for s in scores]) > threshold).astype(int)
        return {"mcc": M.mcc(pred, gold), "accuracy": M.accuracy(pred, gold)}, pred
    if task in ("stsb", "sick"):
        logodds = np.array([s[0] - s[1] for s in scores])
        return {"pearson": M.pearson(logodds, gold), "spearman": M.spearman(logodds, gold)}, logodds
    pred = np.array([int(np.argmax(x)) for x in scores])
    if task in ("sst2", "mrpc"):
        pred = 1 - pred  # candidate 0 is " positive" / " True" (label 1)
    # rte: candidate 0 " True" = entailment = label 0, as the argmax
    metrics = {"accuracy": M.accuracy(pred, gold.astype(int))}
    if task == "mrpc":
        metrics["f1"] = M.f1(pred, gold.astype(int))
    return metrics, pred


def task_baselines(prep: Prepared, scores: list[list[float]], metrics: list[str]) -> dict[str, dict[str, float]]:
    n_choices = [2] * len(scores) if prep.task == "winograd" else [len(s) for s in scores]
    return _baselines(prep.task, prep.gold, n_choices, metrics)


def calibrated_threshold(model, cal: Prepared, batch_size: int, device, dtype) -> tuple[float, float]:
    """cola: the MCC-maximising threshold on the calibration file, and that MCC."""
    c_scores = prepared_scores(model, cal, batch_size, device, dtype)
    return best_threshold(np.array([s[0] for s in c_scores]), cal.gold)


def run_zeroshot(lm, task: str, data: str | Path, calibrate: str | Path | None = None, batch_size: int = 32,
                 log: Callable[[str], None] | None = None, limit: int = 0) -> ZeroShotResult:
    """Score a task file with its zero-shot rule (`limit` > 0: its first `limit` examples)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UserError(f"--limit must be a non-negative integer, got {limit!r}")
    check_task(task, calibrate)
    if calibrate and task != "cola":
        raise UserError(f"--calibrate is for cola only (task {task} has no threshold)")
    tok = lm.tokenizer
    check_answer_words(task, tok)
    prep = prepare_task(task, data, tok, limit)
    for note in prep.loaded.notes:
        log(f"note: {note}")
    if prep.skipped:
        log(f"note: skipped {prep.skipped} example(s) the run's tokenizer cannot encode")
    scores = prepared_scores(lm.model, prep, batch_size, lm.device, lm.dtype)
    threshold, calibration = None, None
    if task == "cola":
        cal = prepare_task(task, calibrate, tok, limit)
        threshold, cal_mcc = calibrated_threshold(lm.model, cal, batch_size, lm.device, lm.dtype)
        calibration = {"file": str(calibrate), "examples": len(cal.kept), "mcc": cal_mcc}
    metrics, pred = rule_metrics(task, scores, prep.gold, threshold)
    if any(math.isnan(v) for v in metrics.values()):
        raise UserError("the metric is undefined on this file (NaN scores)")
    per = [{"line": it.line, "gold": it.gold, "scores": s, "pred": float(p) if task in ("stsb", "sick") else int(p)}
           for it, s, p in zip(prep.kept, scores, pred, strict=True)]
    return ZeroShotResult(task, RULES[task], metrics, task_baselines(prep, scores, list(metrics)), len(prep.kept),
                          prep.skipped, prep.loaded.malformed, threshold, calibration, per)


# ----------------------------------------------------------------------------- during pre-training


def parse_probe_spec(spec: str) -> list[tuple[str, str]]:
    """"sst2:dev.tsv,cola:dev.tsv" -> [("sst2", "dev.tsv"), ("cola", "dev.tsv")]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        task, sep, path = part.partition(":")
        if not part or not sep or not task.strip() or not path.strip():
            raise UserError(f"--zeroshot takes TASK:FILE[,TASK:FILE...], got {part!r}")
        task = task.strip()
        check_task(task, "-", "--zeroshot-calibrate")
        if task in (t for t, _ in out):
            raise UserError(f"--zeroshot names task {task} twice")
        out.append((task, path.strip()))
    return out


def parse_probe_refs(spec: str, tasks: list[str]) -> dict[str, float]:
    """"sst2=0.913,cola=0.454" -> {"sst2": 0.913, "cola": 0.454}; every task named must be probed."""
    refs: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        task, sep, value = part.partition("=")
        try:
            refs[task.strip()] = float(value) if sep else float("nan")
        except ValueError:
            refs[task.strip()] = float("nan")
        if task.strip() not in tasks:
            raise UserError(f"--zeroshot-ref names {task.strip()!r}, which --zeroshot does not score")
        if not math.isfinite(refs[task.strip()]):
            raise UserError(f"--zeroshot-ref takes TASK=NUMBER[,TASK=NUMBER...], got {part!r}")
    return refs


def check_probe_settings(spec: str, refs: str, calibrate: str) -> None:
    """The --zeroshot settings checked before any data is prepared: syntax, task names, files."""
    tasks = parse_probe_spec(spec)
    names = [t for t, _ in tasks]
    parse_probe_refs(refs, names)
    if "cola" in names and not calibrate:
        check_task("cola", None, "--zeroshot-calibrate")
    if calibrate and "cola" not in names:
        raise UserError("--zeroshot-calibrate is for cola only, which --zeroshot does not score")
    for path in [p for _, p in tasks] + ([calibrate] if calibrate else []):
        if not Path(path).is_file():
            raise UserError(f"--zeroshot: task file {path} not found")


class ZeroShotProbe:
    """slmkit's zero-shot rules run on the model at every evaluation of pre-training (GPT-1 Fig. 2
    right). The task files are read and encoded once. Each task's main metric is also reported
    normalised: 0 at random guessing, 1 at the reference score the user gives (1.0 by default)."""

    def __init__(self, spec: str, tokenizer, refs: str = "", calibrate: str = "", limit: int = 0,
                 batch_size: int = 32):
        check_probe_settings(spec, refs, calibrate)
        tasks = parse_probe_spec(spec)
        self.refs = parse_probe_refs(refs, [t for t, _ in tasks])
        self.batch_size = batch_size
        self.tasks: list[Prepared] = []
        for task, path in tasks:
            check_answer_words(task, tokenizer)
            self.tasks.append(prepare_task(task, path, tokenizer, limit))
        self.calibration = prepare_task("cola", calibrate, tokenizer, limit) if calibrate else None
        self.random: dict[str, float] = {}
        for prep in self.tasks:
            shapes = [[0.0] * len(g.candidates) for g in prep.groups]  # winograd's count is fixed at 2
            main = MAIN_METRIC[prep.task]
            self.random[prep.task] = task_baselines(prep, shapes, [main])["random"][main]
            if self.refs.get(prep.task, 1.0) <= self.random[prep.task]:
                raise UserError(f"--zeroshot-ref {prep.task}={self.refs[prep.task]:g} must be above random guessing "
                                f"({self.random[prep.task]:.4f}): the curve is normalised between the two")

    def describe(self) -> str:
        parts = [f"{p.task} ({len(p.kept):,} examples)" for p in self.tasks]
        return "zero-shot probes at every evaluation: " + ", ".join(parts)

    def __call__(self, model, device, dtype) -> dict[str, float]:
        """{"zeroshot/TASK": main metric, "zeroshot/TASK/normalized": the same between random and ref}."""
        out: dict[str, float] = {}
        for prep in self.tasks:
            threshold = None
            if prep.task == "cola":
                threshold, _ = calibrated_threshold(model, self.calibration, self.batch_size, device, dtype)
            scores = prepared_scores(model, prep, self.batch_size, device, dtype)
            metrics, _ = rule_metrics(prep.task, scores, prep.gold, threshold)
            value = metrics[MAIN_METRIC[prep.task]]
            value = 0.0 if math.isnan(value) else value  # a constant prediction: no correlation
            random, ref = self.random[prep.task], self.refs.get(prep.task, 1.0)
            out[f"zeroshot/{prep.task}"] = round(value, 6)
            out[f"zeroshot/{prep.task}/normalized"] = round((value - random) / (ref - random), 6)
        return out
