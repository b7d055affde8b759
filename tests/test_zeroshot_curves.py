"""`slm train --zeroshot`: GPT-1's zero-shot rules scored at every evaluation of pre-training, logged to
metrics.jsonl and plotted beside the loss curve (Fig. 2 right)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli_fails, tiny_config

import slmkit
from slmkit.errors import UserError
from slmkit.runlog import read_metrics
from slmkit.zeroshot import run_zeroshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = ("the film was very positive and the play was very negative . a good story , a bad end .\n"
          "the cat sat on the mat . it is not the dog . the dog sat on a log .\n")
SST = ["sentence\tlabel", "a good story . \t1", "the play was bad . \t0", "the cat sat on the mat . \t1",
       "it is not the dog , a bad end . \t0", "good\t1", "a bad film\t0"]
COLA = ["src\t1\t\tthe cat sat on the mat .", "src\t0\t*\tmat the on sat cat the .",
        "src\t1\t\tthe dog sat on a log .", "src\t0\t*\tlog a dog on the .", "src\t1\t\ta good story ."]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("zc")
    corpus = base / "c.txt"
    corpus.write_text(CORPUS * 60, encoding="utf-8")
    return {"corpus": corpus, "sst": write(base / "sst.tsv", SST), "cola": write(base / "cola.tsv", COLA),
            "base": base}


def bpe_config(files, **train):
    cfg = tiny_config(files["corpus"], max_iters=8, eval_interval=4, sample_tokens=0, final_eval=False, **train)
    cfg.data.tokenizer, cfg.data.bpe_vocab_size, cfg.model.block_size = "bpe", 300, 64
    return cfg


@pytest.fixture(scope="module")
def probed_run(files):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' runs: a float sum's order depends on the thread count
    cfg = bpe_config(files, zeroshot=f"sst2:{files['sst']},cola:{files['cola']}", zeroshot_calibrate=str(files["cola"]),
                     zeroshot_ref="sst2=0.9")
    run = files["base"] / "probed"
    slmkit.train(cfg, run, overwrite=True, progress=False)
    torch.set_num_threads(threads)
    return run


def test_every_evaluation_logs_each_task_and_its_normalised_score(probed_run):
    evals = [r for r in read_metrics(probed_run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # from the untrained model on
    for r in evals:
        for task in ("sst2", "cola"):
            assert f"zeroshot/{task}" in r and f"zeroshot/{task}/normalized" in r
        # sst2: accuracy over 6 two-way examples, normalised between 0.5 (random) and the reference 0.9
        assert r["zeroshot/sst2/normalized"] == pytest.approx((r["zeroshot/sst2"] - 0.5) / 0.4, abs=1e-5)
        assert -1 <= r["zeroshot/cola"] <= 1  # MCC; random guessing is 0 and the reference 1.0
        assert r["zeroshot/cola/normalized"] == pytest.approx(r["zeroshot/cola"], abs=1e-6)


def test_logged_score_is_what_slm_zeroshot_gives_on_the_saved_model(probed_run, files):
    last = [r for r in read_metrics(probed_run) if "val_loss" in r][-1]
    lm = slmkit.load(probed_run, device="cpu", dtype="float32", which="last")
    direct = run_zeroshot(lm, "sst2", files["sst"], log=lambda s: None)
    assert last["zeroshot/sst2"] == pytest.approx(direct.metrics["accuracy"], abs=1e-6)
    cola = run_zeroshot(lm, "cola", files["cola"], calibrate=files["cola"], log=lambda s: None)
    assert last["zeroshot/cola"] == pytest.approx(cola.metrics["mcc"], abs=1e-6)


def test_the_loss_plot_gains_a_zero_shot_panel(probed_run, files):
    import matplotlib.image as mpimg

    plain = files["base"] / "plain"
    slmkit.train(bpe_config(files), plain, overwrite=True, progress=False)
    wide, narrow = mpimg.imread(probed_run / "loss.png"), mpimg.imread(plain / "loss.png")
    assert wide.shape[1] > 1.5 * narrow.shape[1]  # a second panel beside the loss curve
    assert not any(k.startswith("zeroshot/") for r in read_metrics(plain) for k in r)


def test_probes_do_not_change_training(probed_run, files):
    """Scoring in eval mode, with no random draws: the weights equal those of an unprobed run."""
    plain = files["base"] / "plain2"
    slmkit.train(bpe_config(files), plain, overwrite=True, progress=False)
    a = slmkit.load(probed_run, device="cpu", dtype="float32", which="last").model.state_dict()
    b = slmkit.load(plain, device="cpu", dtype="float32", which="last").model.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_cli_flags_limit_and_resume_adds_probes(files, capsys):
    from slmkit.cli import main

    run = files["base"] / "cli"
    args = ["train", "--out-dir", run, "--dataset", files["corpus"], "--tokenizer", "bpe", "--bpe-vocab-size", 300,
            "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--block-size", 64, "--batch-size", 8, "--max-iters", 4,
            "--eval-interval", 2, "--eval-iters", 2, "--device", "cpu", "--dtype", "float32", "--sample-tokens", 0,
            "--no-final-eval", "--quiet", "--zeroshot", f"sst2:{files['sst']}", "--zeroshot-limit", 3]
    main([str(a) for a in args])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["zeroshot"] == f"sst2:{files['sst']}" and cfg["train"]["zeroshot_limit"] == 3
    lm = slmkit.load(run, device="cpu", dtype="float32", which="last")
    first3 = run_zeroshot(lm, "sst2", files["sst"], limit=3, log=lambda s: None)
    last = [r for r in read_metrics(run) if "val_loss" in r][-1]
    assert last["zeroshot/sst2"] == pytest.approx(first3.metrics["accuracy"], abs=1e-6)
    assert first3.examples == 3
    # A resumed run may add a probe: the new task appears from then on.
    main([str(a) for a in ["train", "--resume", run, "--max-iters", 6, "--quiet", "--zeroshot",
                           f"sst2:{files['sst']},cola:{files['cola']}", "--zeroshot-calibrate", files["cola"]]])
    steps = {r["step"]: r for r in read_metrics(run) if "val_loss" in r}
    assert "zeroshot/cola" not in steps[4] and "zeroshot/cola" in steps[6]


@pytest.mark.parametrize("extra, match", [
    (["--zeroshot", "sst2"], "TASK:FILE"),
    (["--zeroshot", "squad:x.tsv"], "unknown zero-shot task 'squad'"),
    (["--zeroshot", "cola:{cola}"], "cola needs --zeroshot-calibrate"),
    (["--zeroshot", "sst2:{sst},sst2:{sst}"], "names task sst2 twice"),
    (["--zeroshot", "sst2:nope.tsv"], "task file nope.tsv not found"),
    (["--zeroshot", "sst2:{sst}", "--zeroshot-ref", "sst2=0.4"], "must be above random guessing"),
    (["--zeroshot", "sst2:{sst}", "--zeroshot-ref", "cola=0.4"], "which --zeroshot does not score"),
    (["--zeroshot", "sst2:{sst}", "--zeroshot-ref", "sst2=high"], "TASK=NUMBER"),
    (["--zeroshot-limit", "5"], "go with --zeroshot"),
])
def test_bad_probe_settings_are_one_line_and_leave_no_folder(files, capsys, extra, match):
    run = files["base"] / "bad"
    args = ["train", "--out-dir", run, "--dataset", files["corpus"], "--tokenizer", "bpe", "--bpe-vocab-size", 300,
            "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--block-size", 64, "--max-iters", 2, "--device", "cpu",
            *[str(e).format(**{k: v for k, v in files.items()}) for e in extra]]
    cli_fails([str(a) for a in args], capsys, match)
    assert not run.exists()


def test_a_char_vocabulary_without_the_answer_words_is_refused(files, capsys):
    run = files["base"] / "char"
    cfg = tiny_config(files["base"] / "c.txt", max_iters=2, zeroshot=f"sst2:{files['sst']}")
    (files["base"] / "c.txt").write_text("abc abc abc\n" * 200, encoding="utf-8")
    with pytest.raises(UserError, match="cannot encode the answer word"):
        slmkit.train(cfg, run, progress=False)
    assert not run.exists()
