"""Experiment trackers (--logger): CSV, TensorBoard, W&B (offline) and MLflow (SQLite), each read
back with its own library; resume; a tracker failing mid-run; a missing one; fine-tunes and sweeps."""

from __future__ import annotations

import csv
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails, tiny_config

from slmkit.checkpoint import save_checkpoint
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.runlog import read_metrics
from slmkit.train import resume_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(corpus: Path, **train_overrides):
    """20 steps, evaluations at 10 and 20, samples at the end: about a second on one thread."""
    cfg = tiny_config(corpus, **train_overrides)
    cfg.model.n_layer, cfg.model.n_embd = 1, 16
    return cfg


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_csv_matches_jsonl(run: Path) -> None:
    """metrics.csv holds every record of metrics.jsonl, in order, value for value."""
    records, rows = read_metrics(run), csv_rows(run)
    assert len(rows) == len(records)
    for record, row in zip(records, rows, strict=True):
        for key, value in row.items():
            if key not in record:
                assert value == "", (key, row)
            elif isinstance(record[key], float):
                assert float(value) == record[key]
            else:
                assert value == str(record[key])


def needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e \".[test]\")")


# ----------------------------------------------------------------------------- CSV


def test_csv_is_a_wide_table_of_every_record(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_corpus, logger="csv"), run, progress=False)
    rows = csv_rows(run)
    header = list(rows[0])
    assert header[0] == "step" and {"loss", "lr", "tokens_per_s", "val_loss", "final_val_loss"} <= set(header)
    assert [r["step"] for r in rows if r["val_loss"]] == ["10", "20"]
    assert rows[-1]["final_val_loss"] and not rows[-1]["loss"]  # the final evaluation's own row
    assert_csv_matches_jsonl(run)
    assert "metrics.csv" in json.loads((run / ".slmkit.json").read_text())["files"]


def test_a_file_of_the_users_at_a_trackers_name_is_refused(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(tiny_corpus, max_iters=4, eval_interval=2, sample_tokens=0), run, progress=False)
    (run / "metrics.csv").write_text("my own numbers\n")
    cfg = resume_config(run, {"train": {"logger": "csv", "max_iters": 6}})  # --logger may change on resume
    with pytest.raises(UserError, match="metrics.csv exists and slmkit did not write it"):
        train(cfg, run, resume=True, progress=False)
    assert (run / "metrics.csv").read_text() == "my own numbers\n"


# ----------------------------------------------------------------------------- TensorBoard, and resume


def read_tensorboard(folder: Path):
    """(tag -> [(step, value)] of every scalar, the EventAccumulator) of the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_scalars_hparams_and_texts(tiny_corpus, tmp_path):
    needs("tensorboard")
    run = tmp_path / "run"
    train(tiny(tiny_corpus, logger="tensorboard"), run, progress=False)
    found, acc = read_tensorboard(run / "tensorboard")
    records = read_metrics(run)
    for key in ("loss", "val_loss", "lr", "tokens_per_s", "final_val_loss"):
        want = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in found[key]] == [s for s, _ in want], key
        assert [v for _, v in found[key]] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert [s for s, _ in found["val_loss"]] == [10, 20]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["n_layer"].number_value == 1 and hparams["logger"].string_value == "tensorboard"
    assert {"config/text_summary", "samples/text_summary"} <= set(acc.Tags()["tensors"])
    sample = acc.Tensors("samples/text_summary")[0]
    assert sample.step == 20 and b"--- sample 1 ---" in sample.tensor_proto.string_val[0]


def test_resume_continues_tensorboard_mlflow_and_adds_csv(tiny_corpus, tmp_path, monkeypatch):
    """An interrupted run resumed from its last checkpoint: TensorBoard purges the steps logged past
    it, MLflow continues the same run (the local SQLite store), and a CSV logger added on resume
    gets the whole history."""
    needs("tensorboard")
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "run"
    cfg = tiny(tiny_corpus, eval_interval=5, logger="tensorboard,mlflow")
    train(cfg, run, progress=False, stop_after_step=12)  # last checkpoint at 10; steps 11-12 logged past it
    first_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    resumed = resume_config(run, {"train": {"logger": "tensorboard,mlflow,csv"}})
    train(resumed, run, resume=True, progress=False)

    found, _ = read_tensorboard(run / "tensorboard")
    assert [s for s, _ in found["loss"]] == list(range(1, 21))  # each step once
    assert [s for s, _ in found["val_loss"]] == [5, 10, 15, 20]
    assert_csv_matches_jsonl(run)
    assert [int(r["step"]) for r in csv_rows(run) if r["loss"]] == list(range(1, 21))

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == first_id
    mlrun = client.get_run(first_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["n_layer"] == "1" and mlrun.data.params["logger"] == "tensorboard,mlflow"
    assert mlrun.data.tags["slmkit.resumed.logger"] == "tensorboard,mlflow,csv"
    steps = [m.step for m in client.get_metric_history(first_id, "val_loss")]
    assert sorted(set(steps)) == [5, 10, 15, 20]
    assert (run / "mlartifacts").is_dir()


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_metrics_params_and_samples(tiny_corpus, tmp_path, monkeypatch):
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts in ./mlruns unless told otherwise
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-runs")
    run = tmp_path / "run"
    train(tiny(tiny_corpus, logger="mlflow"), run, progress=False)
    assert not (run / "mlflow.db").exists()  # the tracking URI decides where it goes
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-runs")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "val_loss")
    records = [r for r in read_metrics(run) if "val_loss" in r]
    assert [(m.step, m.value) for m in history] == pytest.approx([(r["step"], r["val_loss"]) for r in records])
    assert mlrun.data.params["n_layer"] == "1" and mlrun.data.params["max_iters"] == "20"
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert "samples.txt" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


# ----------------------------------------------------------------------------- Weights & Biases


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, quiet, and every wandb folder (cache, config, staging) inside the test's folder."""
    needs("wandb")
    for name, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                      ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log of wandb's own Record messages:
    a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def finished_wandb_records(path: Path, wait_s: float = 30.0) -> list:
    """The records of a finished run's .wandb file. wandb's service process writes the file on its own:
    `run.finish()` may return before the last records (up to the "exit" one) reach it."""
    deadline = time.monotonic() + wait_s
    while True:
        records = wandb_records(path)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_holds_history_config_and_samples_and_resumes(tiny_corpus, tmp_path, wandb_env):
    run = tmp_path / "run"
    train(tiny(tiny_corpus, eval_interval=5, logger="wandb"), run, progress=False, stop_after_step=12)
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
    train(resume_config(run, {}), run, resume=True, progress=False)
    assert json.loads((run / "tracking.json").read_text())["wandb"]["id"] == run_id  # the same W&B run
    sessions = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2  # offline, each session is a folder of the run; `wandb sync` joins them
    records = [r for s in sessions for r in finished_wandb_records(s / f"run-{run_id}.wandb")]

    def items(update) -> dict:
        return {i.key or "/".join(i.nested_key): i.value_json for i in update}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    val = [(json.loads(h["step"]), json.loads(h["val_loss"])) for h in history if "val_loss" in h]
    want = [(r["step"], r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
    assert val == pytest.approx(want) and [s for s, _ in val] == [5, 10, 15, 20]
    assert any(k.startswith("samples") for h in history for k in h)  # samples.txt as a table
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = items(run_record.config.update)
    assert json.loads(config["n_layer"]) == 1 and json.loads(config["logger"]) == "wandb"
    assert run_record.display_name == "run" and run_record.run_id == run_id


# ----------------------------------------------------------------------------- failures


def test_a_tracker_failing_mid_run_warns_once_and_training_finishes(tiny_corpus, tmp_path, monkeypatch, capsys):
    needs("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = {"n": 0}
    real = SummaryWriter.add_scalar

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 12:
            raise RuntimeError("disk went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", flaky)
    run = tmp_path / "run"
    result = train(tiny(tiny_corpus, logger="tensorboard,csv"), run, progress=False)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if "logger failed" in ln]
    assert warnings == [ln for ln in err.splitlines() if ln.startswith("warning: the tensorboard logger failed")]
    assert len(warnings) == 1 and "RuntimeError: disk went away" in warnings[0]
    assert result.step == 20 and result.final_val_loss is not None
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21)) and "final_val_loss" in records[-1]
    assert_csv_matches_jsonl(run)  # the other tracker went on


@pytest.mark.parametrize("logger, modules", [
    ("tensorboard", ["torch.utils.tensorboard"]),
    ("wandb", ["wandb"]),
    ("mlflow", ["mlflow", "mlflow.tracking"]),
])
def test_a_missing_tracker_is_one_line_before_anything_is_written(logger, modules, tiny_corpus, tmp_path,
                                                                   monkeypatch, capsys):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if not installed
    out = tmp_path / "runs" / "x"
    line = cli_fails(["train", "--dataset", tiny_corpus, "--out-dir", out, "--logger", f"csv,{logger}",
                      "--max-iters", "2", "--device", "cpu"], capsys)
    assert line == f'error: --logger {logger} needs {_needs(logger)}: pip install -e ".[{logger}]"'
    # The same line from a fine-tune (before its model loads) and a sweep (before its folder and study exist).
    assert cli_fails(["finetune", "--from", tmp_path / "no-model", "--task", "sst2", "--train", tiny_corpus, "--dev",
                      tiny_corpus, "--out-dir", out, "--logger", logger], capsys) == line
    assert cli_fails(["sweep", "--dataset", tiny_corpus, "--grid", "n_layer=1,2", "--out-dir", out,
                      "--logger", logger], capsys) == line
    assert not (tmp_path / "runs").exists()


def _needs(logger: str) -> str:
    from slmkit.tracking import NEEDS

    return NEEDS[logger]


def test_an_unknown_logger_is_one_line(tiny_corpus, tmp_path, capsys):
    line = cli_fails(["train", "--dataset", tiny_corpus, "--out-dir", tmp_path / "x", "--logger", "csv,neptune"],
                     capsys)
    assert "unknown logger 'neptune'" in line and "csv, tensorboard, wandb, mlflow" in line
    assert not (tmp_path / "x").exists()
    from slmkit.finetune import FinetuneConfig

    with pytest.raises(UserError, match="unknown logger 'tb'"):
        FinetuneConfig(logger="tb").validate()


# ----------------------------------------------------------------------------- fine-tuning and sweeps


def _toy_task(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A random-init char GPT checkpoint and a separable two-label TSV task (train, dev)."""
    import torch

    from slmkit.model import GPT
    from slmkit.tokenizers import CharTokenizer

    tok = CharTokenizer(list(" abcdefghijklmnopqrstuvwxyz"))
    cfg = RunConfig()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size = 1, 2, 16, 32, 0.0, tok.vocab_size
    torch.manual_seed(0)
    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, GPT(m), cfg, tok, {"step": 0})
    rng = np.random.default_rng(0)
    paths = []
    for split, n in (("train", 64), ("dev", 24)):
        rows = [(" ".join("".join(rng.choice(list("abcdef" if i % 3 else "stuvwxyz"), 3)) for _ in range(3)),
                 int(i % 3 != 0)) for i in range(n)]
        p = tmp_path / f"{split}.tsv"
        p.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
        paths.append(p)
    return ckpt, paths[0], paths[1]


def slm(argv: list) -> None:
    from slmkit.cli import main

    main([str(a) for a in argv])


def test_finetune_logs_csv_and_plots_the_majority_baseline(tmp_path, capsys):
    ckpt, train_tsv, dev_tsv = _toy_task(tmp_path)
    out = tmp_path / "ft"
    slm(["finetune", "--from", ckpt, "--task", "toy", "--family", "classification", "--columns", "text",
          "--label-column", "label", "--labels", "0,1", "--train", train_tsv, "--dev", dev_tsv, "--out-dir", out,
          "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--quiet", "--logger", "csv",
          "--device", "cpu", "--dtype", "float32"])
    assert "best dev" in capsys.readouterr().out
    assert_csv_matches_jsonl(out)
    rows = csv_rows(out)
    assert {"loss", "task_loss", "lm_loss", "lr", "examples_per_s", "dev_accuracy"} <= set(rows[0])
    assert len([r for r in rows if r["dev_accuracy"]]) == 2
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["dev_majority_baseline"]["accuracy"] == pytest.approx(16 / 24)  # 2 of every 3 dev rows are 1
    assert summary["config"]["logger"] == "csv"
    assert "dev majority-class baseline: accuracy 0.6667" in (out / "log.txt").read_text()


def test_finetune_png_has_a_fixed_scale_and_the_baseline(tmp_path, monkeypatch):
    from slmkit.finetune import get_task
    from slmkit.finetune import metrics as M
    from slmkit.finetune.loop import plot_finetune

    figures = []
    monkeypatch.setattr("slmkit.finetune.loop.save_figure", lambda fig, path, dpi=100: figures.append(fig))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n"
                                            + json.dumps({"step": 5, "epoch": 1, "dev_mcc": 0.2,
                                                          "dev_accuracy": 0.7}) + "\n")
    gold = np.array([1, 1, 1, 0])
    baseline = M.majority_baseline(["mcc", "accuracy"], gold)
    assert baseline == {"mcc": 0.0, "accuracy": 0.75}
    assert M.majority_baseline(["f1"], gold)["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert M.majority_baseline(["pearson", "spearman"], np.array([1.0, 2.5, 2.5])) == {"pearson": 0.0,
                                                                                       "spearman": 0.0}
    plot_finetune(tmp_path, get_task("cola"), baseline)
    plot_finetune(tmp_path, get_task("sst2"), {"accuracy": 0.75})
    cola, sst2 = (fig.axes[1] for fig in figures)
    assert cola.get_ylim() == pytest.approx((-1.03, 1.03)) and sst2.get_ylim() == pytest.approx((-0.03, 1.03))
    flat = [tuple(line.get_ydata()) for line in cola.get_lines() if len(set(line.get_ydata())) == 1]
    assert (0.0, 0.0) in flat and (0.75, 0.75) in flat  # the majority-class lines, one per metric
    assert any("majority" in t.get_text() for t in figures[1].axes[0].get_legend().get_texts())


def test_a_sweep_trial_logs_to_the_chosen_tracker(tiny_corpus, tmp_path, capsys):
    needs("optuna")
    d = tmp_path / "sw"
    slm(["sweep", "--dataset", tiny_corpus, "--grid", "n_layer=1", "--n-embd", "16", "--n-head", "2",
          "--block-size", "32", "--batch-size", "8", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2",
          "--sample-tokens", "0", "--device", "cpu", "--dtype", "float32", "--logger", "csv", "--out-dir", d,
          "--no-report"])
    assert "this worker ran 1 trial(s)" in capsys.readouterr().out
    trial = d / "trials" / "trial_0000"
    assert_csv_matches_jsonl(trial)
    assert [r["step"] for r in csv_rows(trial) if r["val_loss"]] == ["3", "6"]
    assert json.loads((trial / "config.json").read_text())["train"]["logger"] == "csv"
    assert math.isfinite(float(csv_rows(trial)[-1]["val_loss"]))
