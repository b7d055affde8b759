"""`slm zeroshot`: GPT-1 §5's zero-shot rules over a language model's log-probabilities, batched and
checked against a plain one-sequence-at-a-time computation; calibration, tokenizer conventions, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_fails, shared_file, tiny_config

import slmkit
from slmkit.api import LanguageModel
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.finetune import metrics as M
from slmkit.model import GPT
from slmkit.tokenizers import GPT1Tokenizer, GPT2Tokenizer
from slmkit.zeroshot import Group, best_threshold, load_items, run_zeroshot, score_groups, split_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CORPUS = ("the film was very positive and the play was very negative . a good story , a bad end .\n"
          "True or False ? Question : Answer : the cat sat on the mat . it is not the dog .\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny char run and a tiny BPE run, trained for a few steps on the same small corpus."""
    base = tmp_path_factory.mktemp("zs")
    corpus = base / "c.txt"
    corpus.write_text(CORPUS * 60, encoding="utf-8")
    out = {}
    for kind in ("char", "bpe"):
        cfg = tiny_config(corpus, max_iters=6, eval_interval=6, sample_tokens=0, final_eval=False)
        cfg.data.tokenizer = kind
        cfg.data.bpe_vocab_size = 300
        cfg.model.block_size = 64
        slmkit.train(cfg, base / kind, overwrite=True, progress=False)
        out[kind] = base / kind
    return out


def load_lm(run) -> LanguageModel:
    return slmkit.load(run, device="cpu", dtype="float32")


def slow_logprobs(lm: LanguageModel, context: list[int], cand: list[int]) -> np.ndarray:
    """One plain forward of context + candidate; log P of each candidate token."""
    seq = torch.tensor([context + cand])
    with torch.no_grad():
        logits, _ = lm.model(seq[:, :-1])
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    n = len(context)
    return np.array([logp[n - 1 + i, t].item() for i, t in enumerate(cand)])


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SST = ["sentence\tlabel", "a good story . \t1", "the play was bad . \t0", "the cat sat on the mat . \t1",
       "it is not the dog , a bad end . \t0", "good\t1"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_batched_scores_equal_plain_forward_passes(runs, kind):
    lm = load_lm(runs[kind])
    tok = lm.tokenizer
    texts = ["a good story .", "the cat sat on the mat . it is not the dog .", "good", "the film was very"]
    groups = [split_group(tok, t + " very", [" positive", " negative"]) for t in texts]
    groups.append(Group(tok.encode("the cat"), [tok.encode(" sat on the mat ."), tok.encode(" is")]))
    batched = score_groups(lm.model, groups, batch_size=3)  # two batches of different widths
    for g, got in zip(groups, batched, strict=True):
        assert len(got) == len(g.candidates)
        for cand, lp in zip(g.candidates, got, strict=True):
            np.testing.assert_allclose(lp, slow_logprobs(lm, g.context, cand), atol=2e-5)
    # score_text agrees on the summed log-probability of a whole text after end-of-text (bpe) / its first char
    text = "the cat sat on the mat ."
    s, ids, logp = lm.score_text(text)
    one = score_groups(lm.model, [Group(ids[:1], [ids[1:]])])[0][0]
    assert one.sum() == pytest.approx(-s.nll, abs=1e-4)


def test_sst2_rule_by_hand(runs, tmp_path):
    lm = load_lm(runs["char"])
    data = write(tmp_path / "sst.tsv", SST)
    r = run_zeroshot(lm, "sst2", data, log=lambda s: None)
    tok = lm.tokenizer
    preds = []
    for row, line in zip(r.per_example, SST[1:], strict=True):
        text = line.split("\t")[0].strip()
        ctx = tok.encode(text + " very")
        pos = slow_logprobs(lm, ctx, tok.encode(" positive")).sum()
        neg = slow_logprobs(lm, ctx, tok.encode(" negative")).sum()
        assert row["scores"] == pytest.approx([pos, neg], abs=1e-4)
        preds.append(int(pos > neg))
        assert row["pred"] == preds[-1]
    gold = [int(line[-1]) for line in SST[1:]]
    assert r.metrics["accuracy"] == pytest.approx(np.mean(np.array(preds) == gold))
    assert r.baselines["random"]["accuracy"] == 0.5 and r.baselines["majority"]["accuracy"] == pytest.approx(0.6)


def test_cola_threshold_maximises_mcc(runs, tmp_path):
    rng = np.random.default_rng(0)
    scores, gold = rng.normal(size=40), rng.integers(0, 2, 40)
    t, m = best_threshold(scores, gold)
    brute = max(M.mcc((scores > x).astype(int), gold) for x in np.r_[scores, scores.min() - 1])
    assert m == pytest.approx(brute) and M.mcc((scores > t).astype(int), gold) == pytest.approx(m)
    assert best_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1])) == (2.5, 1.0)

    lm = load_lm(runs["bpe"])
    sents = ["the cat sat on the mat .", "mat the on cat the sat", "a good story , a bad end .", "end bad a , story",
             "the play was very negative .", "was play negative the"]
    data = write(tmp_path / "cola.tsv", [f"src\t{1 - i % 2}\t\t{s}" for i, s in enumerate(sents)])
    r = run_zeroshot(lm, "cola", data, calibrate=data, log=lambda s: None)
    avg = [lm.score_text(s)[0].loss * -1 for s in sents]
    assert [row["scores"][0] for row in r.per_example] == pytest.approx(avg, abs=1e-4)
    t, m = best_threshold(np.array(avg), np.array([1 - i % 2 for i in range(6)]))
    assert r.threshold == pytest.approx(t, abs=1e-6) and r.calibration["mcc"] == pytest.approx(m)
    assert r.metrics["mcc"] == pytest.approx(m)  # calibrated on the same file


def test_multiple_choice_and_storycloze_average(runs, tmp_path):
    lm = load_lm(runs["bpe"])
    tok = lm.tokenizer
    rows = [{"context": "the cat sat on the", "choices": ["mat .", "dog is not", "play"], "label": 0},
            {"context": "a good story ,", "choices": ["a bad end .", "cat"], "label": 1}]
    data = write(tmp_path / "mc.jsonl", [json.dumps(r) for r in rows])
    r = run_zeroshot(lm, "multiple_choice", data, log=lambda s: None)
    for row, spec in zip(r.per_example, rows, strict=True):
        eot = [tok.special["eot"]]
        ctx = eot + tok.encode(spec["context"])
        want = []
        for c in spec["choices"]:
            full = eot + tok.encode(spec["context"] + " " + c)
            k = min(len(ctx), next((i for i, (a, b) in enumerate(zip(ctx, full, strict=False)) if a != b), len(ctx)))
            want.append(slow_logprobs(lm, full[:k], full[k:]).mean())
        assert row["scores"] == pytest.approx(want, abs=1e-4)
        assert row["pred"] == int(np.argmax(want))
    assert r.baselines["random"]["accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_winograd_rule_on_a_hand_written_file(runs, tmp_path):
    lm = load_lm(runs["char"])
    tok = lm.tokenizer
    rows = [{"sentence": "the cat sat on the mat because _ was good .", "options": ["the cat", "the mat"], "label": 0},
            {"sentence": "the play was bad and _ is not good .", "options": ["the film", "the dog"], "label": 1}]
    data = write(tmp_path / "w.jsonl", [json.dumps(r) for r in rows])
    r = run_zeroshot(lm, "winograd", data, log=lambda s: None)
    for row, spec in zip(r.per_example, rows, strict=True):
        left, right = spec["sentence"].split("_")
        want = [slow_logprobs(lm, tok.encode(left + o), tok.encode(right)).mean() for o in spec["options"]]
        assert row["scores"] == pytest.approx(want, abs=1e-4)
        assert row["pred"] == int(np.argmax(want))
    assert r.metrics["accuracy"] == np.mean([row["pred"] == row["gold"] for row in r.per_example])
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"sentence": "no blank", "options": ["a", "b"], "label": 0})])
    with pytest.raises(UserError, match='exactly one "_"'):
        run_zeroshot(lm, "winograd", bad, log=lambda s: None)


def test_entailment_and_similarity_rules(runs, tmp_path):
    lm = load_lm(runs["bpe"])
    tok = lm.tokenizer
    rte = write(tmp_path / "rte.tsv", ["index\tsentence1\tsentence2\tlabel",
                                       "0\tthe cat sat .\tthe cat sat .\tentailment",
                                       "1\tthe cat sat .\tthe dog is bad .\tnot_entailment"])
    r = run_zeroshot(lm, "rte", rte, log=lambda s: None)
    eot = [tok.special["eot"]]
    prompt = "the cat sat .\nQuestion: the dog is bad . True or False?\nAnswer:"
    g = split_group(tok, prompt, [" True", " False"])
    assert g.context[0] == eot[0] and tok.decode(g.candidates[0]) == " True"
    want = [slow_logprobs(lm, g.context, c).sum() for c in g.candidates]
    assert r.per_example[1]["scores"] == pytest.approx(want, abs=1e-4)
    assert r.per_example[1]["pred"] == int(want[1] > want[0])  # 0 = entailment when " True" wins
    stsb = write(tmp_path / "stsb.tsv", ["sentence1\tsentence2\tscore", "a cat .\ta cat .\t5.0",
                                         "a cat .\tthe dog .\t1.0", "the mat .\ta mat .\t3.5"])
    s = run_zeroshot(lm, "stsb", stsb, log=lambda s: None)
    logodds = [row["scores"][0] - row["scores"][1] for row in s.per_example]
    assert s.metrics["pearson"] == pytest.approx(M.pearson(np.array(logodds), np.array([5.0, 1.0, 3.5])))
    assert "NOT from the paper" in s.rule and "not from the paper" in s.line()


@pytest.mark.parametrize("kind", ["gpt2", "gpt1"])
def test_pretrained_tokenizer_conventions(kind, tmp_path):
    folder = shared_file("vocab", kind)
    tok = (GPT2Tokenizer if kind == "gpt2" else GPT1Tokenizer).from_files(folder)
    g = split_group(tok, "A Gorgeous , witty film . very", [" positive", " negative"])
    if kind == "gpt2":
        assert g.candidates == [[tok.encoder["Ġpositive"]], [tok.encoder["Ġnegative"]]]
        assert g.context[0] == tok.special["eot"]
    else:  # lower-cased words that end in </w>
        assert g.candidates == [[tok.encoder["positive</w>"]], [tok.encoder["negative</w>"]]]
        assert g.context[-1] == tok.encoder["very</w>"] and tok.encoder["gorgeous</w>"] in g.context
    m = RunConfig().model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size = 1, 2, 16, 32, 0.0, tok.vocab_size
    torch.manual_seed(0)
    lm = LanguageModel(GPT(m), tok, device="cpu", dtype="float32")
    data = write(tmp_path / "s.tsv", SST)
    r = run_zeroshot(lm, "sst2", data, log=lambda s: None)
    ctx = split_group(tok, "good very", [" positive", " negative"])
    want = [slow_logprobs(lm, ctx.context, c).sum() for c in ctx.candidates]
    assert r.per_example[-1]["scores"] == pytest.approx(want, abs=1e-4)


def test_shipped_sst2_dev_via_cli(runs, capsys):
    dev = shared_file("tasks", "sst2", "dev.tsv")
    from slmkit.cli import main

    main([str(a) for a in ["zeroshot", "--run", runs["bpe"], "--task", "sst2", "--data", dev, "--json",
                           "--device", "cpu", "--dtype", "float32", "--batch-size", "64"]])
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 872 and out["skipped"] == 0 and len(out["per_example"]) == 872
    assert 0.3 < out["metrics"]["accuracy"] < 0.7  # a 6-step model is near chance
    assert out["baselines"]["majority"]["accuracy"] == pytest.approx(444 / 872)
    assert all(len(row["scores"]) == 2 for row in out["per_example"])


def test_one_line_errors(runs, tmp_path, capsys):
    char, bpe = runs["char"], runs["bpe"]
    sst = write(tmp_path / "s.tsv", SST)
    cli_fails(["zeroshot", "--run", bpe, "--task", "squad", "--data", sst], capsys, "unknown zero-shot task 'squad'")
    cli_fails(["zeroshot", "--run", bpe, "--task", "cola", "--data", sst], capsys, "cola needs --calibrate")
    cli_fails(["zeroshot", "--run", bpe, "--task", "rte", "--data", sst], capsys, "header has no column")
    labels = write(tmp_path / "l.tsv", ["sentence\tlabel", "a cat\tpositive", "a dog\tnegative"])
    cli_fails(["zeroshot", "--run", bpe, "--task", "sst2", "--data", labels], capsys, "not in the label set")
    mc = write(tmp_path / "mc.jsonl", [json.dumps({"context": "a", "choices": ["b", "c"], "label": 2})])
    cli_fails(["zeroshot", "--run", bpe, "--task", "multiple_choice", "--data", mc], capsys, "choice index")
    # the char vocabulary of this corpus has no 'x' ... but has every letter of " positive": use a narrower run
    lm = load_lm(char)
    assert "v" in lm.tokenizer.chars
    narrow = tmp_path / "narrow.txt"
    narrow.write_text("the cat sat on the mat . a dog is not bad .\n" * 80)
    cfg = tiny_config(narrow, max_iters=1, eval_interval=1, sample_tokens=0, final_eval=False)
    slmkit.train(cfg, tmp_path / "narrow", overwrite=True, progress=False)
    cli_fails(["zeroshot", "--run", tmp_path / "narrow", "--task", "sst2", "--data", sst], capsys,
              r"cannot encode the answer word ' very'.*'v'")
    cli_fails(["zeroshot", "--run", bpe, "--task", "sst2", "--data", tmp_path / "nope.tsv"], capsys, "not found")
    cli_fails(["zeroshot", "--run", bpe, "--task", "sst2", "--data", sst, "--batch-size", "0"], capsys, "batch-size")


def test_finetuned_run_scores_through_its_language_model(runs, tmp_path):
    from slmkit.finetune import FinetuneConfig, finetune, get_task

    train = write(tmp_path / "t.tsv", SST * 4)
    ft = finetune(runs["char"], get_task("sst2"), train, train, tmp_path / "ft",
                  FinetuneConfig(epochs=1, batch_size=8, device="cpu", dtype="float32"), progress=False)
    assert ft is not None
    lm = load_lm(tmp_path / "ft")
    r = run_zeroshot(lm, "sst2", write(tmp_path / "s.tsv", SST), log=lambda s: None)
    assert r.examples == 5 and lm.tokenizer.kind == "with-specials"


def test_load_items_reads_only_the_rule_fields(tmp_path):
    from slmkit.tokenizers import CharTokenizer

    tok = CharTokenizer(list(" abcdefghijklmnopqrstuvwxyz."))
    data = write(tmp_path / "s.tsv", ["sentence\tlabel", "a b\t1", "c\t0"])
    items = load_items("sst2", data, tok).items
    assert [it.gold for it in items] == [1, 0]
    with pytest.raises(UserError, match="not in this model"):
        split_group(tok, "a!", [" b"])
