"""GPT-1 fine-tuning: transformations, heads, losses, vocabulary growth, training, readers, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from slmkit.checkpoint import build_model, load_checkpoint, save_checkpoint
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.finetune import (
    Example,
    FinetuneConfig,
    FineTuned,
    FineTuneModel,
    WithSpecialsTokenizer,
    add_special_tokens,
    collate,
    encode_example,
    finetune,
    get_task,
    read_examples,
    resize_token_embeddings,
    spec_from_flags,
)
from slmkit.finetune import metrics as M
from slmkit.model import GPT
from slmkit.tokenizers import CharTokenizer, tokenizer_from_dict

ALPHABET = list(" abcdefghijklmnopqrstuvwxyz.!?,'")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt(vocab: int, block: int = 48, seed: int = 0) -> GPT:
    cfg = RunConfig()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size = 2, 2, 32, block, 0.0, vocab
    torch.manual_seed(seed)
    return GPT(m)


@pytest.fixture
def char_setup():
    """A char tokenizer grown by s/$/e and a tiny GPT that matches it."""
    base = CharTokenizer(ALPHABET)
    gpt = tiny_gpt(base.vocab_size)
    tok = add_special_tokens(gpt, base, seed=1)
    return gpt, tok


def ids(tok, text):
    return tok.encode(text)


# ----------------------------------------------------------------------------- transformations


def test_transformations_token_by_token(char_setup):
    _, tok = char_setup
    s, d, e = tok.special["start"], tok.special["delim"], tok.special["extract"]
    assert (s, d, e) == (len(ALPHABET), len(ALPHABET) + 1, len(ALPHABET) + 2)

    cls = encode_example(get_task("sst2"), tok, Example(["ab c"], [], 1, 1), 40)
    assert cls.seqs == [[s, *ids(tok, "ab c"), e]] and cls.label == 1 and not cls.truncated

    ent = encode_example(get_task("rte"), tok, Example(["ab", "cd"], [], 0, 1), 40)
    assert ent.seqs == [[s, *ids(tok, "ab"), d, *ids(tok, "cd"), e]]

    sim = encode_example(get_task("mrpc"), tok, Example(["ab", "xyz"], [], 1, 1), 40)
    assert sim.seqs == [[s, *ids(tok, "ab"), d, *ids(tok, "xyz"), e], [s, *ids(tok, "xyz"), d, *ids(tok, "ab"), e]]

    spec = get_task("storycloze")
    mc = encode_example(spec, tok, Example(["one.", "two."] * 2, ["yes.", "no!"], 1, 1), 40)
    ctx = ids(tok, "one. two. one. two.")
    assert mc.seqs == [[s, *ctx, d, *ids(tok, "yes."), e], [s, *ctx, d, *ids(tok, "no!"), e]]

    # Multiple choice with a question: s context question $ answer e.
    qspec = spec_from_flags("qa", "multiple_choice", "tsv", "0,1", "4", labels="a,b", choice_columns="2,3")
    qa = encode_example(qspec, tok, Example(["the story.", "why?"], ["x", "y"], 0, 1), 40)
    assert qa.seqs[0] == [s, *ids(tok, "the story. why?"), d, *ids(tok, "x"), e]


def test_truncation_sides(char_setup):
    _, tok = char_setup
    s, d, e = tok.special["start"], tok.special["delim"], tok.special["extract"]
    # classification keeps the start of the text
    c = encode_example(get_task("sst2"), tok, Example(["abcdefghij"], [], 0, 1), 6)
    assert c.seqs == [[s, *ids(tok, "abcd"), e]] and c.truncated
    # entailment keeps the whole hypothesis and the end of the premise
    en = encode_example(get_task("rte"), tok, Example(["abcdefgh", "xyz"], [], 0, 1), 8)
    assert en.seqs == [[s, *ids(tok, "gh"), d, *ids(tok, "xyz"), e]] and en.truncated
    # multiple choice keeps the end of the context and every whole answer (context cut once)
    mc = encode_example(get_task("storycloze"), tok, Example(["abcdefgh"], ["xy", "xyz"], 0, 1), 8)
    assert mc.seqs == [[s, *ids(tok, "gh"), d, *ids(tok, "xy"), e], [s, *ids(tok, "gh"), d, *ids(tok, "xyz"), e]]
    # similarity: both orders hold the same tokens
    sim = encode_example(get_task("mrpc"), tok, Example(["abcdefgh", "xyz"], [], 0, 1), 9)
    assert sim.seqs[0] == [s, *ids(tok, "abc"), d, *ids(tok, "xyz"), e]
    assert sorted(sim.seqs[0]) == sorted(sim.seqs[1]) and all(len(q) <= 9 for q in sim.seqs)


# ----------------------------------------------------------------------------- heads and losses


def test_similarity_is_symmetric(char_setup):
    gpt, tok = char_setup
    model = FineTuneModel(gpt, get_task("stsb")).eval()
    spec = model.spec
    a = encode_example(spec, tok, Example(["a cat sat", "the dog ran far"], [], 3.0, 1), 48)
    b = encode_example(spec, tok, Example(["the dog ran far", "a cat sat"], [], 3.0, 1), 48)
    with torch.no_grad():
        out = model(collate([a, b], regression=True)).logits
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_multiple_choice_softmax_masks_padding_choices(char_setup):
    gpt, tok = char_setup
    spec = spec_from_flags("mc3", "multiple_choice", "tsv", "0", "4", labels="1,2,3", choice_columns="1,2,3")
    model = FineTuneModel(gpt, spec).eval()
    three = encode_example(spec, tok, Example(["a story"], ["yes", "no", "maybe"], 2, 1), 48)
    two = encode_example(spec, tok, Example(["another"], ["up", "down"], 0, 2), 48)
    two_spec = get_task("storycloze")
    batch = collate([three, two])
    assert batch.ids.shape[:2] == (2, 3) and batch.lengths[1, 2] == 0
    with torch.no_grad():
        logits = model(batch).logits
        alone = model(collate([two])).logits
    assert logits.shape == (2, 3) and math.isinf(logits[1, 2].item()) and logits[1, 2] < 0
    probs = torch.softmax(logits, dim=-1)
    assert probs[1, 2] == 0 and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(logits[1, :2], alone[0], atol=1e-5)  # padding changes nothing
    assert two_spec.num_outputs == 1  # one logit per answer
    loss = model.task_loss(logits, batch.labels)
    assert torch.isfinite(loss)


def test_mean_pool_reads_the_average_of_the_real_tokens(char_setup):
    gpt, tok = char_setup
    spec = get_task("sst2")
    model = FineTuneModel(gpt, spec, pool="mean").eval()
    short = encode_example(spec, tok, Example(["a cat"], [], 1, 1), 48)
    long = encode_example(spec, tok, Example(["the dog ran far away"], [], 0, 2), 48)
    with torch.no_grad():
        batch = model(collate([short, long])).logits
        alone = model(collate([short])).logits
        ids = torch.tensor([short.seqs[0]])
        expected = model.head(gpt.hidden_states(ids)[0].mean(dim=0))
        extract = FineTuneModel(gpt, spec).eval()
        extract.head.load_state_dict(model.head.state_dict())
        at_extract = extract(collate([short])).logits
    assert torch.allclose(batch[0], alone[0], atol=1e-5)  # padding in the batch changes nothing
    assert torch.allclose(alone[0], expected, atol=1e-5)
    assert not torch.allclose(alone, at_extract, atol=1e-3)
    with pytest.raises(UserError, match="--pool must be one of extract, mean"):
        FineTuneModel(gpt, spec, pool="max")


def test_lm_coef_zero_is_exactly_the_task_loss(char_setup):
    gpt, tok = char_setup
    spec = get_task("rte")
    model = FineTuneModel(gpt, spec).eval()
    exs = [encode_example(spec, tok, Example(["a b c d", "e f"], [], i % 2, i), 48) for i in range(3)]
    exs.append(encode_example(spec, tok, Example(["short", "x"], [], 1, 9), 48))  # padded row
    batch = collate(exs)
    with torch.no_grad():
        total, task, lm = model.loss(batch, 0.0)
        assert lm is None and torch.equal(total, task)
        assert torch.equal(task, torch.nn.functional.cross_entropy(model(batch).logits, batch.labels))
        total5, task5, lm5 = model.loss(batch, 0.5)
        assert torch.allclose(total5, task5 + 0.5 * lm5)
        # L1 by hand: next-token cross-entropy over the real tokens only.
        nll, n = 0.0, 0
        for row, length in zip(batch.ids[:, 0], batch.lengths[:, 0], strict=True):
            seq = row[:length]
            logp = torch.log_softmax(gpt(seq[None])[0][0], dim=-1)
            nll -= logp[torch.arange(length - 1), seq[1:]].sum().item()
            n += length.item() - 1
        assert abs(lm5.item() - nll / n) < 1e-4


def test_resize_keeps_old_rows_bit_identical():
    gpt = tiny_gpt(40)
    old = gpt.transformer.wte.weight.detach().clone()
    resize_token_embeddings(gpt, 43, generator=torch.Generator().manual_seed(0))
    new = gpt.transformer.wte.weight
    assert new.shape == (43, 32) and gpt.config.vocab_size == 43
    assert torch.equal(new[:40], old)
    assert gpt.lm_head.weight is new  # the head is still tied
    assert 0.005 < new[40:].std().item() < 0.05
    assert gpt(torch.tensor([[42, 1]]))[0].shape[-1] == 43


def test_with_specials_tokenizer_roundtrip_and_checkpoint(tmp_path):
    base = CharTokenizer(ALPHABET)
    gpt = tiny_gpt(base.vocab_size)
    tok = add_special_tokens(gpt, base)
    assert isinstance(tok, WithSpecialsTokenizer) and tok.vocab_size == base.vocab_size + 3
    assert add_special_tokens(gpt, tok) is tok  # nothing more to add
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.special == tok.special and again.encode("abc") == base.encode("abc")
    assert tok.decode([tok.special["start"], *base.encode("hi")]) == "<|start|>hi"
    cfg = RunConfig()
    cfg.model = gpt.config
    save_checkpoint(tmp_path / "c.safetensors", gpt, cfg, tok, {"step": 0})
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(build_model(ck).transformer.wte.weight, gpt.transformer.wte.weight)
    # The kind loads without importing slmkit.finetune first (slmkit.load, slm generate).
    import subprocess
    import sys

    code = ("import sys; from slmkit.checkpoint import load_model; "
            "m, t, _ = load_model(sys.argv[1]); print(t.kind, t.vocab_size)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.safetensors")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["with-specials", str(len(ALPHABET) + 3)]


# ----------------------------------------------------------------------------- metrics


def test_metrics_known_values():
    gold, pred = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0])
    assert M.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert M.f1(pred, gold) == pytest.approx(2 / 3)
    assert M.mcc(pred, gold) == pytest.approx(1 / 3)
    assert M.mcc(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0
    x, y = np.array([1.0, 2, 2, 3, 5]), np.array([2.0, 1, 4, 3, 7])
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert M.spearman(x, y) == pytest.approx(6.5 / math.sqrt(95))  # ranks x 1,2.5,2.5,4,5 vs y 2,1,4,3,5


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("task,split,rows", [
    ("sst2", "train.tsv", 67349), ("sst2", "dev.tsv", 872), ("cola", "train.tsv", 7250), ("cola", "dev.tsv", 1301),
    ("rte", "train.tsv", 2241), ("rte", "dev.tsv", 249), ("sick", "train.tsv", 4439), ("sick", "dev.tsv", 495),
    ("stsb", "train.tsv", 5749), ("stsb", "dev.tsv", 1500), ("mrpc", "train.tsv", 3668), ("mrpc", "dev.tsv", 408),
    ("storycloze", "train.csv", 1497), ("storycloze", "dev.csv", 374),
])
def test_task_specs_parse_shared_files(task, split, rows):
    from conftest import shared_file

    r = read_examples(get_task(task), shared_file("tasks", task, split))
    assert len(r.examples) == rows and not r.bad


def test_shared_label_balance():
    from conftest import shared_file

    sick = read_examples(get_task("sick"), shared_file("tasks", "sick", "dev.tsv")).examples
    assert np.bincount([e.label for e in sick]).tolist() == [143, 281, 71]  # ENTAILMENT, NEUTRAL, CONTRADICTION
    sst = read_examples(get_task("sst2"), shared_file("tasks", "sst2", "dev.tsv")).examples
    assert sum(e.label for e in sst) == 444


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    spec = get_task("rte")
    p = tmp_path / "rte.tsv"
    good = [f"{i}\tpremise {i}\thypothesis\tentailment" for i in range(8)]
    p.write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(
        good + ["8\tonly two", "9\tp\th\tmaybe", "10\t \th\tentailment"]) + "\n")
    r = read_examples(spec, p)
    assert len(r.examples) == 8 and [b.line for b in r.bad] == [10, 11, 12]
    msg = r.report()
    assert f"{p}:10: missing column" in msg and "'maybe' is not in the label set" in msg and "empty text" in msg

    p.write_text("index\tsentence1\tsentence2\tlabel\n1\ta\tb\tentailment\n2\tx\n3\ty\n")
    with pytest.raises(UserError, match=r"2 of 3 rows are malformed.*:3: missing column"):
        read_examples(spec, p)
    p.write_text("idx\ts1\ts2\tlabel\n1\ta\tb\tentailment\n")
    with pytest.raises(UserError, match="header has no column"):
        read_examples(spec, p)
    with pytest.raises(UserError, match="not found"):
        read_examples(spec, tmp_path / "nope.tsv")
    stsb = get_task("stsb")
    q = tmp_path / "s.jsonl"
    q.write_text('{"sentence1": "a", "sentence2": "b", "score": 9}\n' * 3)
    js = spec_from_flags("j", "similarity", "jsonl", "sentence1,sentence2", "score", regression="0,5")
    with pytest.raises(UserError, match=r"outside the range \[0.0, 5.0\]"):
        read_examples(js, q)
    assert stsb.is_regression
    with pytest.raises(UserError, match="needs 2 text column"):
        spec_from_flags("x", "entailment", "tsv", "a", "label", labels="0,1")


def test_tsv_quotes_are_literal(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text('sentence\tlabel\n"unbalanced quote\t1\nnext "row\t0\n')
    r = read_examples(get_task("sst2"), p)
    assert [e.segments[0] for e in r.examples] == ['"unbalanced quote', 'next "row']


# ----------------------------------------------------------------------------- training and CLI


def _toy_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Separable: label 1 texts are made of letters a-f, label 0 texts of letters s-z."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        letters = "abcdef" if label else "stuvwxyz"
        words = [''.join(rng.choice(list(letters), size=rng.integers(2, 5))) for _ in range(rng.integers(2, 5))]
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def toy_task(tmp_path):
    """A random-init tiny char GPT checkpoint and a separable TSV task."""
    base = CharTokenizer(ALPHABET)
    gpt = tiny_gpt(base.vocab_size)
    cfg = RunConfig()
    cfg.model = gpt.config
    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, gpt, cfg, base, {"step": 0})
    paths = {}
    for split, n, seed in (("train", 240, 0), ("dev", 60, 1)):
        p = tmp_path / f"{split}.tsv"
        p.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in _toy_rows(n, seed)))
        paths[split] = p
    return ckpt, paths


def test_tiny_model_learns_separable_task(toy_task, tmp_path):
    ckpt, paths = toy_task
    spec = spec_from_flags("toy", "classification", "tsv", "text", "label", labels="0,1")
    cfg = FinetuneConfig(learning_rate=3e-3, batch_size=16, epochs=4, warmup_frac=0.1, device="cpu", dtype="float32")
    r = finetune(ckpt, spec, paths["train"], paths["dev"], tmp_path / "ft", cfg, progress=False)
    assert r.best_dev["accuracy"] >= 0.9
    records = [json.loads(ln) for ln in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert sum("dev_accuracy" in rec for rec in records) == 4 and "lm_loss" in records[0]
    assert (tmp_path / "ft" / "finetune.png").is_file()
    ft = FineTuned.load(tmp_path / "ft")
    assert ft.evaluate(paths["dev"])["accuracy"] == pytest.approx(r.best_dev["accuracy"])
    assert ft.info["label_mapping"]["1"]["value"] == "1" and ft.spec.name == "toy"


def test_a_mean_pooled_model_is_saved_and_loaded_as_one(toy_task, tmp_path):
    ckpt, paths = toy_task
    spec = spec_from_flags("toy", "classification", "tsv", "text", "label", labels="0,1")
    cfg = FinetuneConfig(learning_rate=3e-3, batch_size=16, epochs=2, warmup_frac=0.1, device="cpu", dtype="float32",
                         pool="mean")
    r = finetune(ckpt, spec, paths["train"], paths["dev"], tmp_path / "ft", cfg, progress=False)
    ft = FineTuned.load(tmp_path / "ft")
    assert ft.model.pool == "mean" and ft.info["pool"] == "mean"
    assert ft.evaluate(paths["dev"])["accuracy"] == pytest.approx(r.best_dev["accuracy"])


def test_cli_finetune_predict_evaluate(toy_task, tmp_path, capsys, monkeypatch):
    import io

    from slmkit.cli import main

    ckpt, paths = toy_task
    out = tmp_path / "cli-ft"
    main(["finetune", "--from", str(ckpt), "--task", "toy", "--family", "classification", "--format", "tsv",
          "--columns", "text", "--label-column", "label", "--labels", "0,1", "--label-names", "far,near",
          "--train", str(paths["train"]), "--dev", str(paths["dev"]), "--test", str(paths["dev"]),
          "--out-dir", str(out), "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--quiet", "--max-len", "12",
          "--device", "cpu", "--dtype", "float32"])
    assert "best dev (epoch 1)" in capsys.readouterr().out
    log = (out / "log.txt").read_text()
    n_cut = int(log.split("train: 240 examples from ")[1].split("; ")[1].split(" truncated")[0])
    assert 0 < n_cut < 240 and "truncated to 12 tokens" in log
    main(["evaluate", "--run", str(out), "--data", str(paths["dev"]), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 60 and 0 <= result["accuracy"] <= 1
    main(["predict", "--run", str(out), "--input", str(paths["dev"])])
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 60 and rows[0]["label"] in ("0", "1") and rows[0]["name"] in ("far", "near")
    monkeypatch.setattr("sys.stdin", io.StringIO("abc fed\nzzz yyy\n"))
    main(["predict", "--run", str(out), "--input", "-", "--plain"])
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and "gold" not in rows[0]
    # A fine-tuned checkpoint is still a language model.
    from slmkit.checkpoint import load_model

    model, tok, _ = load_model(out)
    assert model.config.vocab_size == tok.vocab_size == len(ALPHABET) + 3
    with pytest.raises(SystemExit):
        main(["finetune", "--from", str(ckpt), "--task", "toy", "--train", str(paths["train"]),
              "--dev", str(paths["dev"]), "--out-dir", str(tmp_path / "x")])
    assert "unknown task 'toy'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(ckpt), "--data", str(paths["dev"])])
    assert "not a fine-tuned checkpoint" in capsys.readouterr().err


def test_prediction_rows_for_each_output_kind():
    from slmkit.finetune.loop import format_predictions

    stsb, sc, sst = get_task("stsb"), get_task("storycloze"), get_task("sst2")
    reg = format_predictions(stsb, [Example(["a", "b"], [], 3.5, 7)], np.array([2.25]))
    assert reg == [{"line": 7, "score": 2.25, "gold": 3.5}]
    mc = format_predictions(sc, [Example(["story"], ["x", "y"], None, 2)], np.array([[0.2, 0.8]]))
    assert mc[0]["choice"] == 2 and mc[0]["answer"] == "y" and mc[0]["label"] == "2" and "gold" not in mc[0]
    cls = format_predictions(sst, [Example(["good"], [], 1, 3)], np.array([[0.1, 0.9]]))
    assert cls[0]["label"] == "1" and cls[0]["name"] == "positive" and cls[0]["gold"] == "1"


def test_small_models_get_the_small_model_suggestion_and_large_ones_none():
    from slmkit.finetune.loop import SMALL_MODEL_RECIPE, SMALL_MODEL_STEPS, FinetuneConfig, small_model_hint

    paper = FinetuneConfig()  # GPT-1's lr 6.25e-5, batch 32, 3 epochs, warmup 0.2%, lambda 0.5
    hint = small_model_hint(2_000_000, paper, examples=1000)
    small_batch = SMALL_MODEL_RECIPE["batch_size"]
    assert f"--lr {SMALL_MODEL_RECIPE['learning_rate']:g}" in hint and f"--batch-size {small_batch}" in hint
    assert f"--warmup-frac {SMALL_MODEL_RECIPE['warmup_frac']:g}" in hint
    # The epochs that make SMALL_MODEL_STEPS updates at the suggested batch size (3 x 63 are too few).
    assert f"--epochs {-(-SMALL_MODEL_STEPS // -(-1000 // small_batch))}" in hint
    assert small_model_hint(117_000_000, paper, examples=1000) is None  # the size the recipe was set for
    # What the user set is theirs: no suggestion for it.
    mine = FinetuneConfig(learning_rate=2e-4, batch_size=8, epochs=3, warmup_frac=0.05, lm_coef=0.25)
    assert small_model_hint(2_000_000, mine, examples=67_000) is None
