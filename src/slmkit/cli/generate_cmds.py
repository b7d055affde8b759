"""`slm generate`, `slm eval` and `slm score`: a pre-trained language model at work.

`slm eval` is a language model's loss, perplexity and bits/char on text; a fine-tuned model's task
metrics on a labelled file are `slm evaluate` (finetune_cmds). Generation flags are GenerationConfig's
fields, so `slm generate` and `LanguageModel.generate()` share every default."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from slmkit.cli.common import add_json, add_model_source, add_text_input, emit, read_text_arg, read_text_file
from slmkit.cli.flags import Parser, add_dataclass_flags, add_runtime_flags, given, runtime
from slmkit.errors import UserError

GENERATION = "generation"  # the dest prefix of the GenerationConfig flags


def _load(args: argparse.Namespace):
    """The model of --run on --device, in --dtype, with --weights."""
    from slmkit.api import load

    return load(args.run, runtime(args, "device"), runtime(args, "dtype"), args.checkpoint, runtime(args, "weights"))


# ----------------------------------------------------------------------------- generate


def generation_config(args: argparse.Namespace, weights: str = "auto"):
    """GenerationConfig from the flags given; the ones left out keep the dataclass defaults."""
    from slmkit.generate import GenerationConfig

    values = given(args, GENERATION)
    if "stop" in values:  # typed on a command line, "\n" is two characters
        values["stop"] = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in values["stop"])
    gen = GenerationConfig(**values, weights=weights)
    gen.validate()
    return gen


def cmd_generate(args: argparse.Namespace) -> None:
    from slmkit.generate import generate_stream

    if args.interactive:
        from slmkit.cli.chat_cmds import cmd_generate_interactive  # slm chat's loop, without the chat template

        return cmd_generate_interactive(args)
    gen = generation_config(args, runtime(args, "weights"))  # bad settings fail before the model loads
    lm = _load(args)
    prompt = read_text_file(args.prompt_file) if args.prompt_file else args.prompt
    # LanguageModel.generate_stream() draws one sample; here each sample i needs its own seed offset,
    # so the prompt is encoded as the API encodes it (its one private helper used from the CLI).
    ids = lm._prompt_ids(prompt)
    for i in range(gen.num_samples):
        if gen.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        if not args.no_echo:
            sys.stdout.write(prompt)
        for piece in generate_stream(lm.model, lm.tokenizer, gen=gen, device=lm.device, dtype=lm.dtype,
                                     prompt_ids=ids, sample_index=i):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


# ----------------------------------------------------------------------------- eval and score


def cmd_eval(args: argparse.Namespace) -> None:
    from slmkit.cli.common import refuse_finetuned
    from slmkit.data import dataset_tokens, open_prepared

    if args.prepared and args.dataset:
        raise UserError("give --dataset or --prepared, not both")
    refuse_finetuned(args.run, args.checkpoint)
    lm = _load(args)
    data = lm.checkpoint.config.data
    # A text the run was not trained on has no split of its own to pick: all of it is scored.
    split = args.split or ("all" if args.dataset else "val")
    if args.dataset:
        data.dataset = args.dataset
    if args.data_path:
        data.data_path = args.data_path
    # Always the run's own tokenizer: any text is scored in the vocabulary the model was trained on.
    text = (open_prepared(args.prepared).encoded(lm.tokenizer, split) if args.prepared
            else dataset_tokens(data, lm.tokenizer, split))
    tokens = text.tokens
    chars = int(text.chars * (len(tokens) - 1) / max(len(tokens), 1))  # the first token is context only
    s = lm.evaluate_tokens(tokens, chars, args.batch_size)
    payload = {"split": split, "source": text.source, **s.as_dict()}
    emit(args, payload, f"{split} ({text.source}): loss {s.loss:.4f}  perplexity {s.perplexity:.3f}  "
                        f"bits/char {s.bits_per_char:.4f}  ({s.tokens:,} tokens)")


def cmd_score(args: argparse.Namespace) -> None:
    lm = _load(args)
    text = read_text_arg(args)
    s, ids, logp = lm.score_text(text, prepend_eot=not args.no_eot)
    payload: dict[str, Any] = {"log_likelihood": -s.nll, **s.as_dict()}
    scored = ids[len(ids) - len(logp):]
    if args.json:
        payload["tokens_detail"] = [
            {"id": int(t), "token": lm.tokenizer.token_strings([t])[0], "logprob": float(lp)}
            for t, lp in zip(scored, logp, strict=True)
        ]
    emit(args, payload, f"log-likelihood {-s.nll:.4f} nats over {s.tokens} tokens: {s.loss:.4f} per token, "
                        f"perplexity {s.perplexity:.3f}, bits/char {s.bits_per_char:.4f}")


# ----------------------------------------------------------------------------- parsers


def _model_flags(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    add_runtime_flags(p, "device", "dtype", "weights")


def _build_generate(p: Parser) -> None:
    from slmkit.generate import GenerationConfig  # imports torch: only when this command is used

    _model_flags(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--prompt-file", help="read the prompt from a file ('-' = stdin)")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    p.add_argument("--interactive", action="store_true",
                   help="a prompt loop: each line typed is appended to the text so far, which is then continued "
                        "(slm chat's loop and /commands, without its chat template)")
    add_dataclass_flags(p, GenerationConfig, GENERATION, "sampling (the defaults of LanguageModel.generate too)")
    p.set_defaults(func=cmd_generate)


def _build_eval(p: Parser) -> None:
    _model_flags(p)
    p.add_argument("--split", choices=("val", "train", "all"), default=None,
                   help="val or train: that split, cut as training cuts it (the run's val_fraction); all: the "
                        "whole text (default: val of the run's own dataset, all of a --dataset)")
    p.add_argument("--dataset", help="score another corpus (a .txt file, a folder of them, a named dataset or a "
                                     "prepared folder) with the model's own tokenizer")
    p.add_argument("--data-path", help="local file for a named dataset")
    p.add_argument("--prepared", help="a prepared data folder (from slm prepare --out-dir) holding the model's "
                                      "tokens")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    add_json(p)
    p.set_defaults(func=cmd_eval)


def _build_score(p: Parser) -> None:
    _model_flags(p)
    add_text_input(p)
    p.add_argument("--no-eot", action="store_true", help="do not condition the first token on end-of-text")
    add_json(p, "one JSON object, with every token's log-probability")
    p.set_defaults(func=cmd_score)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("generate", help="sample text from a trained model (streams to stdout)", build=_build_generate)
    sub.add_parser("eval", build=_build_eval,
                   help="a language model's loss, perplexity and bits/char on text (task metrics of a fine-tuned "
                        "model: slm evaluate)",
                   description="A language model's loss, perplexity and bits/char on text: a whole split of the "
                               "run's own data, or any text, in consecutive windows (deterministic). For a "
                               "fine-tuned model's task metrics on a labelled file, use slm evaluate.")
    sub.add_parser("score", help="log-likelihood of a text under a model", build=_build_score)
