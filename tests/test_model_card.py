"""Model cards: the README.md `slm export --format hf` writes, and `slm card`, which prints the same text.
Every number in a card is one the run's files hold (metrics.jsonl, the checkpoint)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from conftest import cli_fails, tiny_config

from slmkit.checkpoint import checkpoint_metadata
from slmkit.cli import main
from slmkit.interop.card import model_card
from slmkit.runlog import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A character-level run (the HF export needs --no-tokenizer) and a byte-level BPE run, 20 steps each."""
    from slmkit.train import train

    root = tmp_path_factory.mktemp("card")
    corpus = root / "corpus.txt"
    animals, places = ["cat", "dog", "bird", "fox"], ["mat", "log", "hat"]
    corpus.write_text("".join(f"the {animals[i % 4]} sat on the {places[i % 3]} number {i % 7}.\n" for i in range(400)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMKIT_CACHE", str(root / "cache"))
        train(tiny_config(corpus, max_iters=20, eval_interval=5, sample_tokens=0), root / "char", progress=False)
        cfg = tiny_config(corpus, max_iters=6, eval_interval=3, sample_tokens=0)
        cfg.data.tokenizer, cfg.data.bpe_vocab_size = "bpe", 300
        train(cfg, root / "bpe", progress=False)
    return root


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def index_metrics(front: dict) -> dict[str, float]:
    [entry] = front["model-index"]
    return {m["name"]: m["value"] for r in entry["results"] for m in r["metrics"]}


def card_stdout(argv: list, capsys) -> str:
    capsys.readouterr()
    main(["card", *map(str, argv)])
    return capsys.readouterr().out


def test_front_matter_parses_and_holds_the_runs_numbers(runs):
    run = runs / "char"
    front, body = split_card(model_card(run))
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"slmkit", "gpt2"} <= set(front["tags"])
    assert "license" in front and front["license"] is None  # for the user to fill in
    assert "datasets" not in front

    records = read_metrics(run)
    state = json.loads(checkpoint_metadata(run / "ckpt_best.safetensors")["state"])
    best = min(r["val_loss"] for r in records if "val_loss" in r)
    final = next(r for r in records if "final_val_loss" in r)
    got = index_metrics(front)
    assert got["best validation loss"] == best == state["best_val_loss"]
    assert got["best validation perplexity"] == pytest.approx(math.exp(best))
    assert got["final validation loss (whole split)"] == final["final_val_loss"]
    assert got["final validation bits per character"] == final["final_val_bpc"]
    assert f"Best validation loss {best:.4f}" in body
    assert "n_layer 2, n_head 2, n_embd 32, block_size 32" in body
    assert f"parameters: {state['params']:,}" in body and "tokenizer `char`" in body
    steps = max(r["step"] for r in records)
    assert steps == 20 and f"Steps: {steps:,}; tokens seen: {steps * 8 * 32:,}" in body
    assert "Zero-shot" not in body and "AutoTokenizer" not in body  # char: no HF tokenizer


def test_card_dataset_flag_fills_datasets(runs, capsys):
    text = card_stdout(["--run", runs / "char", "--card-dataset", "tiny_shakespeare", "--card-dataset", "karpathy/x"],
                       capsys)
    front, body = split_card(text)
    assert front["datasets"] == ["tiny_shakespeare", "karpathy/x"]
    assert "trained on `tiny_shakespeare`, `karpathy/x`" in body


def test_missing_metrics_are_left_out(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "char", run)
    (run / "metrics.jsonl").unlink()
    front, body = split_card(model_card(run))
    state = json.loads(checkpoint_metadata(run / "ckpt_best.safetensors")["state"])
    # Only the checkpoint's own best validation loss is left: no final evaluation, no step count from the log.
    assert index_metrics(front) == {"best validation loss": state["best_val_loss"],
                                    "best validation perplexity": pytest.approx(math.exp(state["best_val_loss"]))}
    assert "Whole validation split" not in body and "final validation" not in body


def test_the_last_zero_shot_probes_are_included(runs, tmp_path):
    """`slm train --zeroshot` records: the card reports the probes of the last evaluation that has them."""
    run = tmp_path / "run"
    shutil.copytree(runs / "char", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "val_loss": 3.0, "zeroshot/sst2": 0.5, "zeroshot/sst2/normalized": 0.0}) + "\n")
        f.write(json.dumps({"step": 20, "val_loss": 2.9, "zeroshot/sst2": 0.625, "zeroshot/sst2/normalized": 0.3,
                            "zeroshot/cola": 0.1, "zeroshot/cola/normalized": 0.22}) + "\n")
    front, body = split_card(model_card(run))
    got = {r["task"]["type"]: [(m["type"], m["value"]) for m in r["metrics"]]
           for r in front["model-index"][0]["results"] if r["task"]["type"].startswith("zero-shot")}
    assert got == {"zero-shot sst2": [("accuracy", 0.625)], "zero-shot cola": [("mcc", 0.1)]}
    assert "Zero-shot `sst2` (GPT-1 section 5 rule, `slm train --zeroshot`) at step 20: accuracy 0.6250, " \
           "normalised +0.300" in body


def test_export_writes_the_card_and_still_loads(runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    main(["export", "--run", str(runs / "bpe"), "--format", "hf", "--out-dir", str(out), "--card-dataset", "toy"])
    written = (out / "README.md").read_text()
    assert written == card_stdout(["--run", runs / "bpe", "--card-dataset", "toy"], capsys)
    front, body = split_card(written)
    assert front["datasets"] == ["toy"] and "AutoTokenizer.from_pretrained" in body and "tokenizer `bpe`" in body
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert f"vocabulary: {model.config.vocab_size:,} tokens" in body and len(tok) == model.config.vocab_size
    # A character-level run exports with --no-tokenizer; its card says so, and is again slm card's text.
    main(["export", "--run", str(runs / "char"), "--out-dir", str(tmp_path / "hf-char"), "--no-tokenizer"])
    written = (tmp_path / "hf-char" / "README.md").read_text()
    assert written == card_stdout(["--run", runs / "char"], capsys)
    assert "datasets" not in split_card(written)[0] and "holds no tokenizer files" in written
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-char")


def test_finetuned_run_card_has_its_dev_metrics(runs, tmp_path):
    from slmkit.finetune import FinetuneConfig, finetune, spec_from_flags

    rows = {"train": 48, "dev": 16}
    for split, n in rows.items():
        lines = [f"the {'cat' if i % 2 else 'dog'} sat on the {'mat' if i % 2 else 'log'}\t{i % 2}" for i in range(n)]
        (tmp_path / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(lines) + "\n")
    spec = spec_from_flags("toy", "classification", "tsv", "text", "label", labels="0,1")
    cfg = FinetuneConfig(learning_rate=3e-3, batch_size=16, epochs=2, device="cpu", dtype="float32")
    finetune(runs / "char", spec, tmp_path / "train.tsv", tmp_path / "dev.tsv", tmp_path / "ft", cfg, progress=False)
    front, body = split_card(model_card(tmp_path / "ft"))
    state = json.loads(checkpoint_metadata(tmp_path / "ft" / "ckpt_best.safetensors")["state"])
    dev = next(r for r in read_metrics(tmp_path / "ft") if r.get("epoch") == state["epoch"] and "dev_accuracy" in r)
    assert index_metrics(front)["dev accuracy"] == dev["dev_accuracy"]
    assert "fine-tuned" in front["tags"] and "Fine-tuned (GPT-1 style) on task `toy`" in body
    assert "best validation loss" not in index_metrics(front)  # a task model: no language-model loss claimed
    assert "slm predict" in body


def test_missing_or_foreign_run_is_one_line(tmp_path, capsys):
    cli_fails(["card", "--run", tmp_path / "nope"], capsys, "no such run directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ckpt_best.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b'{"a": 1}')
    cli_fails(["card", "--run", tmp_path / "other"], capsys, "not an slmkit run")
