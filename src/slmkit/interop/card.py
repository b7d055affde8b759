"""Model cards: the README.md that `slm export --format hf` writes beside the weights, and that
`slm card` prints. One generator for both.

Every number comes from the run's own files: the checkpoint's header (config, tokenizer, training
state, fine-tuning metadata) and metrics.jsonl. What they do not hold is left out, never guessed.
The front matter is YAML in the Hugging Face Hub's model-card format (`library_name`, `tags`,
`license` for the user to fill, `datasets` only when named, `model-index` with the run's results).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmkit.budget import param_count
from slmkit.checkpoint import checkpoint_metadata, find_checkpoint
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.runlog import read_metrics
from slmkit.zeroshot import MAIN_METRIC

CARD = "README.md"
HF_TOKENIZERS = ("bpe", "gpt2", "gpt1")  # the tokenizer kinds `slm export` writes in a Hugging Face format
LICENSE_LINE = "license:  # fill in: the license you release these weights under (e.g. mit, apache-2.0)"
PLACEHOLDER = "path/to/this/folder"  # or the Hub repo id the folder is uploaded to


@dataclass
class Result:
    """One `model-index` result: a task, the data it was measured on, and named values."""

    task: str
    dataset: str
    split: str
    metrics: list[tuple[str, str, float]] = field(default_factory=list)  # (type, name, value)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


def _ppl(loss: float) -> float | None:
    return math.exp(loss) if loss < 50 else None


def _name_of(source: Any) -> str:
    """A dataset's name as the run recorded it (a file's name, not the folder it sat in on that machine)."""
    return Path(source).name if isinstance(source, str) and source.strip() else ""


def _tokenizer_kind(tok: dict[str, Any]) -> str:
    kind = str(tok.get("kind", "unknown"))
    if kind == "with-specials" and isinstance(tok.get("base"), dict):
        return f"{tok['base'].get('kind', 'unknown')} + special tokens"
    return kind


def _read(run: str | Path, which: str) -> tuple[Path, Path, RunConfig, dict[str, Any], dict[str, Any], dict[str, str]]:
    ckpt = find_checkpoint(run, which)
    meta = checkpoint_metadata(ckpt)
    if meta is None:
        raise UserError(f"{ckpt} is not an slmkit checkpoint: {run} is not an slmkit run")
    try:
        cfg = RunConfig.from_dict(json.loads(meta["config"]))
        tok = json.loads(meta["tokenizer"])
        state = json.loads(meta.get("state", "{}"))
    except (KeyError, TypeError, ValueError, AttributeError, UserError):
        raise UserError(f"checkpoint {ckpt} has corrupted metadata") from None
    if not isinstance(tok, dict) or not isinstance(state, dict):
        raise UserError(f"checkpoint {ckpt} has corrupted metadata")
    folder = Path(run) if Path(run).is_dir() else ckpt.parent
    return folder, ckpt, cfg, tok, state, meta


def model_card(run: str | Path, which: str = "best", datasets: list[str] | tuple[str, ...] = (),
               with_tokenizer: bool | None = None) -> str:
    """The model card (markdown with YAML front matter) for the run `run`, describing its Hugging Face
    export. `with_tokenizer`: whether the export holds tokenizer files (None: whenever HF can hold
    this run's tokenizer, as `slm export` does by default)."""
    folder, ckpt, cfg, tok, state, meta = _read(run, which)
    records = read_metrics(folder)
    m = cfg.model
    family = "gpt2" if m.ln == "pre" else "openai-gpt"
    kind = _tokenizer_kind(tok)
    if with_tokenizer is None:
        with_tokenizer = tok.get("kind") in HF_TOKENIZERS
    name = folder.resolve().name or "model"
    finetune = _json(meta.get("finetune"))
    imported = state.get("imported_from") if isinstance(state.get("imported_from"), dict) else None
    data = _name_of(state.get("data")) or ("" if imported or finetune else _name_of(cfg.data.dataset))

    results: list[Result] = []
    train_lines, eval_lines = [], []
    params = state["params"] if isinstance(state.get("params"), int) else param_count(m)

    # ------------------------------------------------------------------ training
    if imported:
        src = imported.get("src", "")
        train_lines.append(f"- Imported from {imported.get('format', 'another format')}"
                           f"{' (' + str(imported.get('model_type')) + ')' if imported.get('model_type') else ''}"
                           f"{' `' + _name_of(src) + '`' if src else ''}: trained elsewhere, not by slmkit.")
    if finetune:
        spec = finetune.get("spec") if isinstance(finetune.get("spec"), dict) else {}
        task = str(spec.get("name") or state.get("task") or "a task")
        src = finetune.get("source")
        src = "/".join(Path(src).parts[-2:]) if isinstance(src, str) and src.strip() else ""
        train_lines.append(f"- Fine-tuned (GPT-1 style) on task `{task}`"
                           f"{' (' + str(spec['family']) + ')' if spec.get('family') else ''}"
                           f"{' from `' + src + '`' if src else ''}.")
        steps = max((r["step"] for r in records), default=None)
        if steps:
            train_lines.append(f"- Steps: {steps:,}.")
        if isinstance(state.get("epoch"), int):
            train_lines.append(f"- Exported checkpoint: the best dev epoch, {state['epoch']}.")
    elif not imported:
        steps = max((r["step"] for r in records), default=0) or (state.get("step") if _finite(state.get("step")) else 0)
        if steps:
            world = state.get("world_size") if isinstance(state.get("world_size"), int) else 1
            per_step = cfg.train.batch_size * cfg.train.grad_accum * world * m.block_size
            train_lines.append(f"- Steps: {steps:,}; tokens seen: {steps * per_step:,} ({per_step:,} per step: "
                               f"{cfg.train.batch_size} x {cfg.train.grad_accum} sequences"
                               f"{f' x {world} processes' if world > 1 else ''} of {m.block_size} tokens).")
        if data:
            train_lines.append(f"- Data: `{data}`.")
        if _finite(state.get("step")):
            train_lines.append(f"- Exported checkpoint: `{ckpt.name}` (step {state['step']:,}).")

    # ------------------------------------------------------------------ evaluation
    if finetune:
        spec = finetune.get("spec") if isinstance(finetune.get("spec"), dict) else {}
        task = str(spec.get("name") or state.get("task") or "task")
        family_type = str(spec.get("family") or "fine-tuned task")
        dev = _dev_metrics(records, state, finetune)
        if dev:
            results.append(Result(family_type, task, "dev", [(k, f"dev {k}", v) for k, v in dev.items()]))
            eval_lines.append(f"- `{task}` dev (best epoch): " + ", ".join(f"{k} {_fmt(v)}" for k, v in dev.items()))
        test = _last_prefixed(records, "test_")
        if test:
            results.append(Result(family_type, task, "test", [(k, f"test {k}", v) for k, v in test.items()]))
            eval_lines.append(f"- `{task}` test (best dev epoch): " +
                              ", ".join(f"{k} {_fmt(v)}" for k, v in test.items()))
    else:
        lm = Result("text-generation", data or name, "validation")
        vals = [(r["step"], r["val_loss"]) for r in records if _finite(r.get("val_loss"))]
        best = min(vals, key=lambda sv: sv[1]) if vals else None
        if best is None and _finite(state.get("best_val_loss")):
            best = (state.get("step"), state["best_val_loss"])
        if best is not None:
            ppl = _ppl(best[1])
            lm.metrics.append(("loss", "best validation loss", best[1]))
            if ppl is not None:
                lm.metrics.append(("perplexity", "best validation perplexity", ppl))
            eval_lines.append(f"- Best validation loss {_fmt(best[1])}"
                              f"{f' (perplexity {ppl:.2f})' if ppl is not None else ''}"
                              f"{f' at step {best[0]:,}' if isinstance(best[0], int) else ''}, on a fixed sample of "
                              f"{cfg.train.eval_iters} x {cfg.train.batch_size} validation sequences.")
        final = next((r for r in reversed(records) if _finite(r.get("final_val_loss"))), None)
        if final is not None:
            loss, ppl = final["final_val_loss"], _ppl(final["final_val_loss"])
            lm.metrics.append(("loss", "final validation loss (whole split)", loss))
            extra = [f"perplexity {ppl:.2f}"] if ppl is not None else []
            if _finite(final.get("final_val_bpc")):
                lm.metrics.append(("bpc", "final validation bits per character", final["final_val_bpc"]))
                extra.append(f"{final['final_val_bpc']:.4f} bits per character")
            eval_lines.append(f"- Whole validation split, model after the last step ({final['step']:,}): loss "
                              f"{_fmt(loss)}{' (' + ', '.join(extra) + ')' if extra else ''}.")
        if lm.metrics:
            results.append(lm)
    probed = next((r for r in reversed(records) if _zeroshot(r)), None)
    for task, metric, value, norm in _zeroshot(probed) if probed else []:
        results.append(Result(f"zero-shot {task}", task, "", [(metric, f"zero-shot {metric}", value)]))
        eval_lines.append(f"- Zero-shot `{task}` (GPT-1 section 5 rule, `slm train --zeroshot`) at step "
                          f"{probed['step']:,}: {metric} {_fmt(value)}, normalised {norm:+.3f} "
                          "(0 = random guessing, 1 = the reference given)")

    # ------------------------------------------------------------------ front matter
    head: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["slmkit", family, "text-generation", "causal-lm"]}
    if finetune:
        head["tags"].append("fine-tuned")
    tail: dict[str, Any] = {}
    if datasets:
        tail["datasets"] = list(datasets)
    if results:
        tail["model-index"] = [{"name": name, "results": [_index_entry(r) for r in results]}]
    front = _yaml(head) + LICENSE_LINE + "\n" + (_yaml(tail) if tail else "")

    # ------------------------------------------------------------------ body
    arch = [f"- {family} (`{'GPT2LMHeadModel' if family == 'gpt2' else 'OpenAIGPTLMHeadModel'}` in transformers): "
            f"{m.ln}-LN decoder-only transformer, tied input/output embeddings",
            f"- n_layer {m.n_layer}, n_head {m.n_head}, n_embd {m.n_embd}, block_size {m.block_size}, "
            f"MLP width {m.mlp_width}",
            f"- vocabulary: {m.vocab_size:,} tokens, tokenizer `{kind}`",
            f"- parameters: {params:,}"]
    named = ", ".join(f"`{d}`" for d in datasets) or (f"`{data}`" if data else "")
    on = f" trained on {named}: it knows little beyond that data" if named and not imported else \
        ": it knows little beyond its training data"
    size = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params:,}"
    body = [f"# {name}", "",
            f"A small GPT language model {'fine-tuned' if finetune else 'trained'} with "
            f"slmkit and exported to the Hugging Face `{family}` format." if not imported else
            f"A GPT model imported into slmkit and exported to the Hugging Face `{family}` format.", "",
            "## Architecture", "", *arch, ""]
    if train_lines:
        body += ["## Training", "", *train_lines, ""]
    if eval_lines:
        body += ["## Evaluation", "", *eval_lines, ""]
    body += ["## How to use", "", "With transformers:", "", "```python",
             "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if with_tokenizer else ""), "",
             f'model = AutoModelForCausalLM.from_pretrained("{PLACEHOLDER}")  # or the Hub repo id']
    if with_tokenizer:
        body += [f'tokenizer = AutoTokenizer.from_pretrained("{PLACEHOLDER}")',
                 'ids = tokenizer("Hello", return_tensors="pt").input_ids',
                 "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))"]
    body += ["```", ""]
    if not with_tokenizer:
        why = "exported with --no-tokenizer" if tok.get("kind") in HF_TOKENIZERS else \
            f"the `{kind}` tokenizer has no Hugging Face class"
        body += [f"This export holds no tokenizer files ({why}): tokenize with slmkit, from the run folder.", ""]
    if finetune:
        body += ["The export holds the language model only: the task head stays in the slmkit run. With slmkit:", "",
                 "```bash", "slm predict --run RUN_DIR --input examples.tsv --output preds.jsonl", "```", ""]
    else:
        body += ["With slmkit, from the run folder:", "", "```python", "import slmkit", "",
                 'lm = slmkit.load("RUN_DIR")', 'print(lm.generate("Hello", max_new_tokens=40)[0])', "```", ""]
    body += ["## Limitations", "",
             f"A small model ({size} parameters){on}, makes factual and grammatical mistakes, and has had no safety "
             "tuning. Use it for study and experiments, not for anything that matters.", ""]
    return "---\n" + front + "---\n\n" + "\n".join(body)


def _yaml(d: dict[str, Any]) -> str:
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _index_entry(r: Result) -> dict[str, Any]:
    dataset: dict[str, Any] = {"name": r.dataset, "type": r.dataset}
    if r.split:
        dataset["split"] = r.split
    return {"task": {"type": r.task}, "dataset": dataset,
            "metrics": [{"type": t, "name": n, "value": v} for t, n, v in r.metrics]}


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix) and _finite(v)}


def _dev_metrics(records: list[dict[str, Any]], state: dict[str, Any], info: dict[str, Any]) -> dict[str, float]:
    """The dev metrics of the exported (best) epoch, as metrics.jsonl records them; else the checkpoint's."""
    epoch = state.get("epoch", info.get("epoch"))
    for r in reversed(records):
        if r.get("epoch") == epoch and any(k.startswith("dev_") for k in r):
            return _numbers(r, "dev_")
    dev = state.get("dev") if isinstance(state.get("dev"), dict) else info.get("dev")
    return _numbers(dev) if isinstance(dev, dict) else {}


def _last_prefixed(records: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    for r in reversed(records):
        if any(k.startswith(prefix) for k in r):
            return _numbers(r, prefix)
    return {}


def _zeroshot(r: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """The zero-shot probes of an evaluation record (`zeroshot/TASK` and `zeroshot/TASK/normalized`,
    as `slm train --zeroshot` logs them): (task, metric, value, normalised value) for each task."""
    out = []
    for key, value in r.items():
        parts = key.split("/")
        norm = r.get(f"{key}/normalized")
        if len(parts) == 2 and parts[0] == "zeroshot" and _finite(value) and _finite(norm):
            out.append((parts[1], MAIN_METRIC.get(parts[1], "score"), float(value), float(norm)))
    return out
