"""`slm lm-eval`: EleutherAI's lm-evaluation-harness over a run, through the model class `slmkit`.

    import slmkit.evalharness            # registers the model name "slmkit" with lm_eval
    import lm_eval
    lm_eval.simple_evaluate(model="slmkit", model_args="run=runs/demo,dtype=float32", tasks=["hellaswag"])

`SlmkitLM` subclasses lm_eval's TemplateLM, so a (context, continuation) pair is tokenized by lm_eval's
own rules, exactly as its `hf` model does: trailing spaces of the context move to the continuation,
context + continuation are encoded whole and split after the context's own tokens, and an empty
context is replaced by the prefix token. The prefix token is the run's end-of-text token (BPE, GPT-2);
a run without one (a character vocabulary) uses its newline character, and a GPT-1 vocabulary its
start token. A sequence longer than the context is cut from the left, the continuation kept whole
(`hf`'s rule); rolling log-likelihoods use lm_eval's own disjoint windows of the whole context.

Requests are sorted longest first and scored in batches (right-padded, one forward pass each; the
language-model head runs only on the positions that are scored). generate_until decodes one request
at a time with the KV cache (greedy unless the task asks for sampling), stops at the task's `until`
strings, the end-of-text token or `max_gen_toks`, and sees the last block_size - max_gen_toks tokens
of its context (all block_size of them, sliding as `slm generate` does, when max_gen_toks fills the
context).

lm_eval is an optional extra: importing this module without it works (nothing is registered), and
using it is a one-line error naming the install command.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.api import LanguageModel, load
from slmkit.errors import UserError
from slmkit.generate import GenerationConfig, generate_text
from slmkit.runtime import autocast

EXTRA_HINT = 'slm lm-eval needs lm-evaluation-harness: pip install -e ".[lm-eval]"'
MODEL_NAME = "slmkit"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BOOTSTRAP_ITERS = 1000

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the optional extra is absent: the class exists, making one is a one-line error
    TemplateLM = object  # type: ignore[assignment,misc]


def require_lm_eval() -> None:
    """A one-line error naming the install command when lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.api.model  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
    except ImportError:
        raise UserError(EXTRA_HINT) from None


def _batch_size(value: Any) -> int:
    """lm_eval passes batch sizes as given on its command line: 16, "16", "auto" or "auto:4"."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE  # no memory probing: "auto" means the default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise UserError(f"batch_size must be a positive integer, got {value!r}")
    return n


def prefix_id(tokenizer) -> int:
    """The token an empty context (and the first rolling window) starts from: end-of-text where the
    vocabulary has one, else the newline character, else GPT-1's start token."""
    eot = tokenizer.special.get("eot")
    if eot is not None:
        return int(eot)
    try:
        ids = tokenizer.encode("\n")
    except UserError:
        ids = []
    if len(ids) == 1:
        return int(ids[0])
    if "start" in tokenizer.special:
        return int(tokenizer.special["start"])
    raise UserError(f"the run's {tokenizer.kind} tokenizer has no end-of-text token and no newline token to "
                    "start an empty context from")


class SlmkitLM(TemplateLM):
    """An slmkit run as an lm_eval model. model_args: run (a run folder or checkpoint file; `pretrained`
    is an alias), checkpoint (best|last), device, dtype (auto|float32|bfloat16|float16), batch_size,
    max_gen_toks. `lm=` takes a LanguageModel already loaded (Python only)."""

    backend = "causal"

    def __init__(self, run: str | None = None, checkpoint: str = "best", device: str | None = None,
                 dtype: str = "auto", batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, pretrained: str | None = None,
                 lm: LanguageModel | None = None, max_batch_size: Any = None, **unused: Any):
        require_lm_eval()
        super().__init__()
        if unused:
            raise UserError(f"unknown slmkit model argument(s): {', '.join(sorted(unused))} (known: run, "
                            "checkpoint, device, dtype, batch_size, max_gen_toks)")
        run = run or pretrained
        if lm is None:
            if not run:
                raise UserError("the slmkit model needs run=RUN_DIR (model_args='run=runs/X')")
            lm = load(str(run), device or "auto", dtype or "auto", checkpoint)
        self.lm = lm
        self.run = str(run) if run else None
        self.checkpoint = checkpoint
        self.model = lm.model.eval()
        self.tokenizer = lm.tokenizer  # lm_eval's TemplateLM reads `tokenizer` (chat templates: none)
        self._device = lm.device
        self.dtype = lm.dtype
        self.batch_size = _batch_size(batch_size)
        try:
            self._max_gen_toks = int(max_gen_toks)
        except (TypeError, ValueError):
            raise UserError(f"max_gen_toks must be an integer, got {max_gen_toks!r}") from None
        self._prefix = prefix_id(self.tokenizer)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SlmkitLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> SlmkitLM:
        """model_args win over lm_eval's own settings (its CLI always passes --device, default cuda:0,
        which its `hf` model drops when there is no GPU: so does this one)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ what lm_eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self._prefix  # used by lm_eval only as the prefix of an empty context

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return int(self.model.config.block_size)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"slmkit-{self.tokenizer.kind}-{self.tokenizer.fingerprint()}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return None  # plain-text runs: no chat template

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The run's own tokenizer; it adds no special tokens (like GPT-2's)."""
        try:
            return self.tokenizer.encode(string)
        except UserError as exc:
            raise UserError(f"the run's {self.tokenizer.kind} tokenizer cannot encode a task text "
                            f"({string[:40]!r}...): {exc}") from None

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"slmkit_run": self.run, "slmkit_checkpoint": self.checkpoint,
                "slmkit_tokenizer": self.tokenizer.kind, "slmkit_block_size": cfg.block_size,
                "slmkit_params": int(sum(p.numel() for p in self.model.parameters())),
                "slmkit_device": str(self._device), "slmkit_dtype": str(self.dtype).removeprefix("torch.")}

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) for each
        (key, context tokens, continuation tokens): `hf`'s rule, in batches sorted longest first."""
        block = self.max_length
        rows = []
        for _key, ctx, cont in requests:
            if not ctx or not cont:
                raise UserError("an lm_eval request has an empty context or continuation after tokenization")
            if len(cont) > block:
                raise UserError(f"a continuation of {len(cont)} tokens does not fit in the model's context "
                                f"of {block} tokens")
            rows.append(((list(ctx) + list(cont))[-(block + 1):][:-1], list(cont)))
        order = sorted(range(len(rows)), key=lambda i: (-(len(rows[i][0]) + 1), rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in _progress(range(0, len(order), self.batch_size), disable_tqdm, "loglikelihood batches"):
                idx = order[start:start + self.batch_size]
                for i, result in zip(idx, self._score_batch([rows[i] for i in idx]), strict=True):
                    out[i] = result
        finally:
            self.model.train(was_training)
        for (key, _, _), result in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        device = self._device
        T = max(len(inp) for inp, _ in rows)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        r_idx, t_idx, targets = [], [], []
        for r, (inp, cont) in enumerate(rows):
            x[r, :len(inp)] = torch.tensor(inp)  # right-padded: causal attention never sees the pads
            first = len(inp) - len(cont)
            r_idx += [r] * len(cont)
            t_idx += range(first, len(inp))
            targets += cont
        with autocast(device, self.dtype):
            h = self.model.hidden_states(x.to(device))
            logits = self.model.lm_head(h[torch.tensor(r_idx, device=device), torch.tensor(t_idx, device=device)])
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(targets, device=device)
        picked = logp.gather(-1, tgt[:, None]).squeeze(-1).cpu()  # summed in float32, as hf does
        greedy = (logp.argmax(dim=-1) == tgt).cpu()
        out, at = [], 0
        for _, cont in rows:
            n = len(cont)
            out.append((float(picked[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in lm_eval's disjoint windows of the full context, the first
        one after the prefix token; all windows of all texts are batched together."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in _progress(requests, disable_tqdm, "generate_until requests"):
            context, gen_kwargs = req.args
            out.append(self.generate_one(context, gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any] | None = None) -> str:
        """One continuation of `context` under lm_eval's generation arguments (until, max_gen_toks and
        its aliases, do_sample, temperature, top_k, top_p)."""
        gen = self.generation_config(gen_kwargs or {})
        if gen.max_new_tokens == 0:
            return ""
        ids = self.tok_encode(context) or [self.prefix_token_id]
        room = self.max_length - gen.max_new_tokens  # hf's rule: the context leaves room for the new tokens
        ids = ids[-room:] if room > 0 else ids[-self.max_length:]
        return generate_text(self.model, self.tokenizer, gen=gen, device=self._device, dtype=self.dtype,
                             prompt_ids=ids)[0]

    def generation_config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None)
        until = [] if until is None else [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise UserError(f"generation 'until' must be a string or a list of strings, got {until!r}")
        max_new = next((kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens",
                                                "max_completion_tokens") if kwargs.get(k) is not None),
                       self.max_gen_toks)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = kwargs.pop("do_sample", None)
        if do_sample is None:
            do_sample = temperature > 0
        sample = bool(do_sample) and temperature > 0
        top_k = int(kwargs.pop("top_k", 0) or 0)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        gen = GenerationConfig(max_new_tokens=int(max_new), temperature=temperature if sample else 0.0,
                               top_k=top_k, top_p=top_p, stop=tuple(s for s in until if s), stop_at_eot=True,
                               num_samples=1)
        gen.validate()
        return gen


def _progress(items, disable: bool, desc: str) -> Iterator:
    if disable:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, file=sys.stderr, leave=False))


def register() -> None:
    """Make `model="slmkit"` known to lm_eval (once; lm_eval's own models stay listed)."""
    import lm_eval.models  # noqa: F401  (lm_eval's own entries first: get_model refills an *empty* registry)
    from lm_eval.api import registry

    if MODEL_NAME not in registry.MODEL_REGISTRY:  # a dict before lm_eval 0.4.10, a Registry since
        registry.register_model(MODEL_NAME)(SlmkitLM)


if TemplateLM is not object:
    register()


# ----------------------------------------------------------------------------- slm lm-eval


def find_tasks(names: list[str], include_path: str | None):
    """A TaskManager that knows every name, or a one-line error naming the unknown ones. With an
    include path whose folder alone defines them all, lm_eval's own ~15,000 task files are not indexed."""
    import difflib

    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: no such folder")
    if include_path is not None or all(_is_yaml(n) for n in names):
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, n) for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" (nor in --include-path {include_path})" if include_path else ""
        raise UserError(f"unknown lm-eval task {unknown[0]!r}{where}{hint} (`lm_eval ls tasks` lists them)")
    return manager


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or _is_yaml(name)


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool) -> Iterator[None]:
    """lm_eval and datasets log to stderr at INFO level; keep warnings only unless verbose. Anything
    they print goes to stderr too: stdout is the results."""
    import os
    from unittest import mock

    import lm_eval.evaluator

    names = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "evaluate")
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO if verbose else logging.WARNING)
    # Bootstrapped stderrs in this process: lm_eval's pool would fork a process that holds torch's
    # threads (and slm's SIGTERM handler). No `git describe` of the current folder, whose "fatal: not a
    # git repository" would reach stderr (the hash is the working folder's, not the model's). And the
    # versions alone for the environment: torch's full report runs `pip list` and more (3 s).
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr), \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None, create=True), \
                mock.patch.object(lm_eval.evaluator, "add_env_info", _versions, create=True):
            yield
    finally:
        for lg, level in zip(loggers, before, strict=True):
            lg.setLevel(level)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def _versions(storage: dict[str, Any]) -> None:
    import importlib.metadata

    from slmkit import __version__

    storage.update(lm_eval_version=importlib.metadata.version("lm_eval"), torch_version=torch.__version__,
                   slmkit_version=__version__)


def run_lm_eval(run: str | Path | LanguageModel, tasks: list[str], *, checkpoint: str = "best",
                limit: float | None = None, num_fewshot: int | None = None, include_path: str | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto", dtype: str = "auto",
                log_samples: bool = False, bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
                gen_kwargs: dict[str, Any] | None = None, seed: int = 1234, verbose: bool = False,
                task_manager: Any = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate over a run (or a loaded LanguageModel); lm_eval's result dict."""
    require_lm_eval()
    import jinja2
    import lm_eval

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--tasks needs at least one task name")
    if limit is not None and (isinstance(limit, bool) or not limit > 0 or math.isinf(limit)):
        raise UserError(f"--limit must be positive, got {limit!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must not be negative, got {num_fewshot}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if bootstrap_iters < 0:
        raise UserError(f"--bootstrap-iters must not be negative, got {bootstrap_iters}")
    if isinstance(run, LanguageModel):
        model = SlmkitLM(lm=run, batch_size=batch_size)
    else:
        if not Path(run).exists():
            raise UserError(f"no run directory or checkpoint at {run}")
        model = None
    with quiet_lm_eval(verbose):
        manager = task_manager or find_tasks(tasks, include_path)
        if model is None:
            model = SlmkitLM(run=str(run), checkpoint=checkpoint, device=device, dtype=dtype,
                             batch_size=batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=log_samples, bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except UserError:
            raise
        except (KeyError, ValueError, OSError, jinja2.TemplateError) as exc:  # task files, data, network
            raise UserError(f"lm-eval could not run {', '.join(tasks)}: {_reason(exc)}") from None
    results["config"]["model"] = MODEL_NAME
    results["config"]["model_args"] = f"run={model.run}" if model.run else "(a loaded model)"
    return results


def _reason(exc: BaseException) -> str:
    import jinja2

    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, jinja2.TemplateError):
        text = f"a task template failed: {text}"
    text = (text.strip().splitlines() or [type(exc).__name__])[0]
    offline = ("offline", "Offline", "Couldn't reach", "Max retries")
    if any(s in text for s in offline) or isinstance(exc, ConnectionError):
        text += " (this task's data comes from the Hugging Face Hub: it needs network access)"
    return text


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter): value, stderr (None when lm_eval computed none) and samples."""
    rows = []
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            if section == "results" and task in (results.get("groups") or {}):
                continue
            n = (results.get("n-samples") or {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                    continue
                metric, _, filt = key.partition(",")
                err = metrics.get(f"{metric}_stderr,{filt}")
                rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                             "stderr": float(err) if isinstance(err, int | float) else None, "n": n})
    return rows


def table(results: dict[str, Any]) -> str:
    rows = result_rows(results)
    head = ["task", "metric", "value", "stderr", "n"]
    body = [[r["task"], r["metric"] + ("" if r["filter"] in ("none", "") else f" ({r['filter']})"),
             f"{r['value']:.4f}", "" if r["stderr"] is None else f"{r['stderr']:.4f}",
             "" if r["n"] is None else str(r["n"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *body]]
    return "\n".join(line.rstrip() for line in lines)


def json_payload(results: dict[str, Any], samples: bool = False) -> dict[str, Any]:
    """What `slm lm-eval --json` prints: lm_eval's results, groups, configuration and versions (and,
    with samples, every request's responses), made JSON-safe."""
    keys = ["results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "lm_eval_version", "torch_version", "slmkit_version"]
    if samples:
        keys += ["samples"]
    out = {k: results[k] for k in keys if k in results}
    out["rows"] = result_rows(results)
    return _json_safe(out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x is None or isinstance(x, str | int | float | bool):
        return x
    if hasattr(x, "item"):  # numpy / torch scalars
        return _json_safe(x.item())
    return str(x)


# ----------------------------------------------------------------------------- lm_eval's own CLI


def lm_eval_cli(argv: list[str] | None = None) -> None:
    """lm_eval's own command line with the model "slmkit" registered: `python -m slmkit.evalharness
    --model slmkit --model_args run=runs/X --tasks ...` (lm_eval 0.4 loads no third-party model by itself:
    no plugin entry points, a fixed table of its own models)."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]  # lm_eval's parser reads sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_cli()
