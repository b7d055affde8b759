"""`slm lm-eval`: the lm-evaluation-harness model class `slmkit` agrees with lm_eval's own `hf` model run on
the same model exported with `slm export --format hf` (the same accuracy, every per-request log-likelihood
within 1e-4), on local task YAMLs over shipped data (no network): Story Cloze as multiple choice, rolling
perplexity over Gutenberg lines, a LAMBADA-style last word, and greedy generation. Plus the CLI's lines."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest
from conftest import cli_fails, one_error_line, shared_file, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MISSING = [m for m in ("lm_eval", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
needs_harness = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install -e '.[lm-eval]')")
TOL = 1e-4
TASKS = ["slm_storycloze", "slm_gutenberg_ppl", "slm_lastword", "slm_storycloze_gen"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def task_yamls(folder, storycloze, gutenberg) -> None:
    """JSONL files made from the shipped data, and four task YAMLs (lm_eval's `json` dataset loader)."""
    rows = list(csv.DictReader(storycloze.open(encoding="utf-8")))[:40]
    with (folder / "storycloze.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"context": " ".join(r[f"InputSentence{i}"] for i in range(1, 5)),
                                "choices": [r["RandomFifthSentenceQuiz1"], r["RandomFifthSentenceQuiz2"]],
                                "label": int(r["AnswerRightEnding"]) - 1}) + "\n")
    with gutenberg.open(encoding="utf-8") as f:
        lines = [ln.strip() for _, ln in zip(range(400), f, strict=False) if len(ln.split()) >= 4][:30]
    with (folder / "gutenberg.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": ln}) + "\n" for ln in lines)
    data = {"sc": folder / "storycloze.jsonl", "gb": folder / "gutenberg.jsonl"}

    def metric(name, agg, higher):
        return f"  - metric: {name}\n    aggregation: {agg}\n    higher_is_better: {higher}\n"

    def head(task, key, split, output_type):
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    {split}: {data[key]}\n"
                f"output_type: {output_type}\n{split}_split: {split}\n")

    (folder / "storycloze.yaml").write_text(
        head("slm_storycloze", "sc", "validation", "multiple_choice")
        + 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n'
        + metric("acc", "mean", "true") + metric("acc_norm", "mean", "true"))
    (folder / "gutenberg.yaml").write_text(
        head("slm_gutenberg_ppl", "gb", "test", "loglikelihood_rolling")
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        + metric("word_perplexity", "weighted_perplexity", "false")
        + metric("byte_perplexity", "weighted_perplexity", "false")
        + metric("bits_per_byte", "bits_per_byte", "false"))
    (folder / "lastword.yaml").write_text(
        head("slm_lastword", "gb", "test", "loglikelihood")
        + "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        + "metric_list:\n" + metric("acc", "mean", "true"))
    (folder / "generate.yaml").write_text(
        head("slm_storycloze_gen", "sc", "validation", "generate_until")
        + 'doc_to_text: "{{context}}"\ndoc_to_target: "{{choices[label]}}"\n'
        + 'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 12\n  do_sample: false\n'
        + "metric_list:\n" + metric("exact_match", "mean", "true"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, module_one_torch_thread):
    """A tiny BPE run (block 64, so long stories are cut from the left), its HF export, a tiny char run,
    and the task folder."""
    import slmkit
    from slmkit.cli import main

    train_txt = shared_file("corpus", "gutenberg", "train.txt")
    valid_txt = shared_file("corpus", "gutenberg", "valid.txt")
    storycloze = shared_file("tasks", "storycloze", "dev.csv")
    root = tmp_path_factory.mktemp("lmeval")
    corpus = root / "corpus.txt"
    animals, places = ["cat", "dog", "bird", "fox"], ["mat", "log", "hat"]
    # A pattern the tiny model learns in 120 steps (so its greedy text reaches "." and "\n"), then book text.
    pattern = "".join(f"the {animals[i % 4]} sat on the {places[i % 3]} number {i % 7}.\n" for i in range(1500))
    with train_txt.open(encoding="utf-8") as f:
        corpus.write_text(pattern + f.read(60_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMKIT_CACHE", str(root / "cache"))
        cfg = tiny_config(corpus, max_iters=120, eval_interval=120, sample_tokens=0, final_eval=False)
        cfg.data.tokenizer, cfg.data.bpe_vocab_size, cfg.model.block_size = "bpe", 400, 64
        slmkit.train(cfg, root / "bpe", progress=False)
        cfg = tiny_config(corpus, max_iters=4, eval_interval=4, sample_tokens=0, final_eval=False)
        slmkit.train(cfg, root / "char", progress=False)
    main(["export", "--run", str(root / "bpe"), "--out", str(root / "hf"), "--format", "hf"])
    (root / "tasks").mkdir()
    task_yamls(root / "tasks", storycloze, valid_txt)
    return root


@pytest.fixture(scope="module")
def manager(setup):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(setup / "tasks"), include_defaults=False)


def response_values(sample) -> list[tuple]:
    """Each request's response of one logged sample: (loglikelihood, is_greedy), (loglikelihood,) or (text,)."""
    out = []
    for r in sample["resps"]:
        v = r[0]
        out.append(tuple(v) if isinstance(v, tuple | list) else (v,))
    return out


@pytest.fixture(scope="module")
def both(setup, manager):
    """simple_evaluate with model="slmkit" and with model="hf" on the export, float32, samples logged."""
    import lm_eval

    import slmkit.evalharness  # noqa: F401  (registers "slmkit")

    out = {}
    for name, args in (("slmkit", f"run={setup / 'bpe'},dtype=float32,device=cpu"),
                       ("hf", f"pretrained={setup / 'hf'},dtype=float32,device=cpu")):
        out[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=TASKS, limit=40, batch_size=8,
                                            task_manager=manager, log_samples=True, bootstrap_iters=0)
    return out


@needs_harness
def test_agrees_with_the_hf_model_on_the_export(both):
    ours, theirs = both["slmkit"], both["hf"]
    worst = {}
    for task in TASKS:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) >= 30
        diffs = []
        for x, y in zip(a, b, strict=True):
            assert x["arguments"] == y["arguments"]  # the same requests
            for rx, ry in zip(response_values(x), response_values(y), strict=True):
                if task == "slm_storycloze_gen":
                    assert rx == ry  # greedy generation: the same text
                    continue
                assert abs(rx[0] - ry[0]) <= TOL, (task, x["doc_id"], rx, ry)
                assert rx[1:] == ry[1:]  # is_greedy
                diffs.append(abs(rx[0] - ry[0]))
        worst[task] = max(diffs, default=0.0)
        for key, value in ours["results"][task].items():
            if "," in key and "stderr" not in key:
                expected = theirs["results"][task][key]
                assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), (task, key)
    texts = [response_values(s)[0][0] for s in ours["samples"]["slm_storycloze_gen"]]
    assert any(t.strip() for t in texts) and not any("." in t for t in texts)  # real text, cut at `until`
    acc = ours["results"]["slm_storycloze"]["acc,none"]
    assert acc == theirs["results"]["slm_storycloze"]["acc,none"]
    print(f"max |d loglikelihood| per task: {worst}; storycloze acc {acc}")


@needs_harness
def test_truncation_and_empty_context_follow_hf_rules(setup):
    """Long contexts are cut from the left to block_size tokens; an empty context scores after the
    prefix (end-of-text) token: both checked against a plain forward pass."""
    import torch
    from lm_eval.api.instance import Instance

    import slmkit
    from slmkit.evalharness import SlmkitLM

    lm = slmkit.load(setup / "bpe", device="cpu", dtype="float32")
    model = SlmkitLM(lm=lm, batch_size=3)
    tok, eot = lm.tokenizer, lm.tokenizer.special["eot"]
    long_ctx = "It was the best of times, it was the worst of times, " * 8
    reqs = [("", "the cat sat"), (long_ctx, " and so on"), ("Once upon a time ", "there was")]
    got = model.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)

    def plain(ctx_ids, cont_ids):
        seq = (ctx_ids + cont_ids)[-(lm.config.block_size + 1):]
        with torch.no_grad():
            logits, _ = lm.model(torch.tensor([seq[:-1]]))
        logp = torch.log_softmax(logits[0].float(), -1)
        n = len(seq) - 1
        return sum(logp[n - len(cont_ids) + i, t].item() for i, t in enumerate(cont_ids))

    assert len(tok.encode(long_ctx)) > lm.config.block_size

    def pair(ctx, cont):  # lm_eval's rule: the context's trailing spaces go to the continuation; encode whole, split
        ctx_ids = tok.encode(ctx.rstrip())
        return ctx_ids, tok.encode(ctx + cont)[len(ctx_ids):]

    expected = [plain([eot], tok.encode("the cat sat")), plain(*pair(*reqs[1])), plain(*pair(*reqs[2]))]
    for (value, _), want in zip(got, expected, strict=True):
        assert value == pytest.approx(want, abs=TOL)


@needs_harness
def test_generate_until_is_greedy_decoding_and_stops_at_until(setup):
    from lm_eval.api.instance import Instance

    import slmkit
    from slmkit.evalharness import SlmkitLM

    lm = slmkit.load(setup / "bpe", device="cpu", dtype="float32")
    model = SlmkitLM(lm=lm)
    prompt = "the cat sat"
    free = lm.generate(prompt, temperature=0, max_new_tokens=24)[0]  # what `slm generate --temperature 0` prints
    [plain] = model.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 24}), 0)],
                                   disable_tqdm=True)
    assert plain == free
    assert free.index(".") > 0 and "\n" in free, free  # the tiny model has learnt the pattern
    reqs = [(prompt, {"until": ["."], "max_gen_toks": 24}), (prompt, {"until": ["\n", "number"], "max_gen_toks": 24}),
            (prompt, {"until": ".", "max_gen_toks": 3}),
            (prompt, {"until": ["\u2603"], "max_new_tokens": 5, "do_sample": False, "temperature": 0.7})]
    dot, first, short, five = model.generate_until(
        [Instance("generate_until", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    assert dot == free[:free.index(".")] and dot
    assert first == free[:min(free.index("\n"), free.index("number"))]
    assert short == lm.generate(prompt, temperature=0, max_new_tokens=3)[0] and len(lm.tokenizer.encode(short)) <= 3
    assert five == lm.generate(prompt, temperature=0, max_new_tokens=5)[0]  # do_sample=False: greedy


@needs_harness
def test_a_char_run_starts_from_newline_and_names_a_character_it_lacks(setup):
    from lm_eval.api.instance import Instance

    import slmkit
    from slmkit.errors import UserError
    from slmkit.evalharness import SlmkitLM

    lm = slmkit.load(setup / "char", device="cpu", dtype="float32")
    model = SlmkitLM(lm=lm)
    assert model.prefix_token_id == lm.tokenizer.encode("\n")[0]
    [(value, _)] = model.loglikelihood([Instance("loglikelihood", {}, ("", "the"), 0)], disable_tqdm=True)
    assert value < 0
    with pytest.raises(UserError, match="not in this model's character vocabulary"):
        model.loglikelihood([Instance("loglikelihood", {}, ("the \u2603", " cat"), 0)], disable_tqdm=True)


@needs_harness
def test_registered_with_lm_eval_and_its_own_models_stay():
    from lm_eval.api.registry import get_model

    from slmkit.evalharness import SlmkitLM

    assert get_model("slmkit") is SlmkitLM
    assert get_model("hf").__name__ == "HFLM"


@needs_harness
def test_cli_prints_a_table_and_json(setup, capsys):
    from slmkit.cli import main

    argv = ["lm-eval", "--run", str(setup / "bpe"), "--tasks", "slm_storycloze,slm_gutenberg_ppl",
            "--include-path", str(setup / "tasks"), "--limit", "10", "--device", "cpu", "--dtype", "float32"]
    main(argv)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert any(ln.split()[:2] == ["slm_storycloze", "acc"] for ln in lines)
    assert any(ln.split()[:2] == ["slm_gutenberg_ppl", "bits_per_byte"] for ln in lines)
    assert "Traceback" not in err
    main([*argv, "--json", "--log-samples", "--output", str(setup / "out.json")])
    out = capsys.readouterr().out
    payload = json.loads(out)
    assert payload == json.loads((setup / "out.json").read_text())
    assert payload["config"]["model"] == "slmkit" and payload["config"]["slmkit_dtype"] == "float32"
    assert 0 <= payload["results"]["slm_storycloze"]["acc,none"] <= 1
    assert payload["n-samples"]["slm_storycloze"]["effective"] == 10
    assert len(payload["samples"]["slm_gutenberg_ppl"]) == 10
    assert {r["metric"] for r in payload["rows"]} >= {"acc", "acc_norm", "word_perplexity", "bits_per_byte"}


@needs_harness
def test_lm_eval_cli_runs_the_slmkit_model(setup, capsys):
    """lm_eval's own command line, with the model registered: python -m slmkit.evalharness --model slmkit ..."""
    from slmkit.evalharness import lm_eval_cli

    argv = ["--model", "slmkit", "--model_args", f"run={setup / 'bpe'},dtype=float32,device=cpu",
            "--tasks", "slm_storycloze", "--include_path", str(setup / "tasks"), "--limit", "4"]
    old = sys.argv
    try:
        lm_eval_cli(argv)
    finally:
        sys.argv = old
    out = capsys.readouterr().out
    assert "slm_storycloze" in out and "acc" in out


# ----------------------------------------------------------------------------- one-line errors


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    if not MISSING:
        import slmkit.evalharness  # noqa: F401  (imported with lm_eval, as later tests need it)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    line = cli_fails(["lm-eval", "--run", tmp_path, "--tasks", "hellaswag"], capsys)
    assert line == 'error: slm lm-eval needs lm-evaluation-harness: pip install -e ".[lm-eval]"'


@needs_harness
def test_missing_run_is_one_line(tmp_path, capsys):
    cli_fails(["lm-eval", "--run", tmp_path / "nope", "--tasks", "hellaswag"], capsys, "no run directory or checkpoint")


@needs_harness
def test_unknown_task_is_one_line(setup, capsys):
    line = cli_fails(["lm-eval", "--run", setup / "bpe", "--tasks", "slm_storycloze,hellaswagg",
                      "--include-path", setup / "tasks"], capsys, "unknown lm-eval task 'hellaswagg'")
    assert "hellaswag" in line.split("did you mean", 1)[1]


def test_without_lm_eval_slmkit_imports_and_the_command_is_one_line(tmp_path):
    """A fresh process where lm_eval cannot be imported: slmkit.evalharness still imports (nothing is
    registered) and `slm lm-eval` exits 1 with the install line, no traceback."""
    import os
    import subprocess

    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import slmkit, slmkit.evalharness as e\n"
            "assert e.TemplateLM is object, e.TemplateLM\n"
            "from slmkit.entry import main\n"
            f"main(['lm-eval', '--run', {str(tmp_path)!r}, '--tasks', 'hellaswag'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 1, proc.stderr
    assert one_error_line(proc.stderr) == 'error: slm lm-eval needs lm-evaluation-harness: pip install -e ".[lm-eval]"'
