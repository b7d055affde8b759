"""The run log (records, text, progress, plots), the learning-rate schedules and the optimizer groups
that pre-training, fine-tuning and sweeps share."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import UserError
from slmkit.fileio import TMP_SUFFIX
from slmkit.model import GPT
from slmkit.optim import make_adamw, optimizer_groups
from slmkit.runlog import METRICS, Progress, RunLog, format_seconds, pyplot, read_metrics, save_figure
from slmkit.schedule import lr_at, warmup_cosine, warmup_linear

# ----------------------------------------------------------------------------- records


def test_records_are_appended_and_read_back(tmp_path):
    log = RunLog(tmp_path, echo=False)
    records = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "val_loss": 2.4}]
    for r in records:
        log.record(r)
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == records
    assert read_metrics(tmp_path) == records and log.read() == records


def test_a_missing_metrics_file_reads_as_no_records(tmp_path):
    assert read_metrics(tmp_path) == [] and RunLog(None, echo=False).read() == []


def test_malformed_and_deeply_nested_lines_are_skipped_with_one_warning(tmp_path, capsys):
    good = [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    lines = [json.dumps(good[0]), "this is not json", "[" * 100_000 + "]" * 100_000,
             '{"a": ' * 100_000 + "1" + "}" * 100_000, "[1, 2]", '{"step": "two"}', "", json.dumps(good[1])]
    (tmp_path / METRICS).write_text("\n".join(lines) + "\n")
    assert read_metrics(tmp_path) == good
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 5 malformed line(s)" in err and "Traceback" not in err


def test_truncate_on_resume_drops_records_past_the_step_and_the_final_evaluation(tmp_path, capsys):
    log = RunLog(tmp_path, echo=False)
    for step in range(1, 6):
        log.record({"step": step, "loss": 1.0 / step})
    log.record({"step": 5, "final_val_loss": 0.2, "final_val_bpc": 0.3})
    with open(tmp_path / METRICS, "a") as f:
        f.write("torn wri\n")
    log.truncate_after(3)
    assert read_metrics(tmp_path) == [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    assert "malformed" in capsys.readouterr().err  # the torn line was reported once, and is gone
    log.truncate_after(10)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert capsys.readouterr().err == ""


def test_truncate_without_a_metrics_file_or_folder_writes_nothing(tmp_path):
    RunLog(tmp_path, echo=False).truncate_after(3)
    RunLog(None, echo=False).truncate_after(3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [METRICS, "log.txt"])
def test_a_symlink_in_place_of_a_log_file_is_refused_and_its_target_untouched(tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    log = RunLog(run, text_file="log.txt", echo=False)
    with pytest.raises(UserError) as exc:
        log.record({"step": 1}) if name == METRICS else log.text("a line")
    assert "symbolic link" in str(exc.value) and len(str(exc.value).splitlines()) == 1
    assert victim.read_text() == "precious"


def test_a_log_without_a_folder_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = RunLog(None, echo=False)
    log.record({"step": 1})
    log.text("a line")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- text and progress


def test_text_lines_are_held_until_the_folder_is_opened(tmp_path, capsys):
    run = tmp_path / "run"
    log = RunLog(None, text_file="log.txt", echo=True)
    log.text("loaded the model")
    assert not run.exists()
    run.mkdir()
    log.open(run)
    log.text("epoch 1: dev accuracy 0.5")
    log.record({"step": 1, "loss": 0.7})
    assert (run / "log.txt").read_text() == "loaded the model\nepoch 1: dev accuracy 0.5\n"
    assert read_metrics(run) == [{"step": 1, "loss": 0.7}]
    out = capsys.readouterr()
    assert out.out == "" and out.err == "loaded the model\nepoch 1: dev accuracy 0.5\n"


def test_console_lines_go_to_stderr_never_stdout(capsys):
    log = RunLog(None, echo=True)
    log.text("training for 4 steps")
    bar = log.progress(4, 0)  # capsys' stderr is not a terminal: plain lines, no bar
    bar.update(2, {"loss": "1.2345", "val": None}, line=True)
    bar.update(3, {"loss": "1.1"}, line=False)
    bar.close()
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "training for 4 steps\nstep 2 loss 1.2345\n"


def test_a_quiet_log_shows_nothing(capsys):
    log = RunLog(None, echo=False)
    log.text("hidden")
    Progress(4, 0, log.echo).update(1, {"loss": "1.0"}, line=True)
    log.echo = True
    log.text("shown")
    assert capsys.readouterr() == ("", "shown\n")


class _Recorder:
    def __init__(self):
        self.records, self.lines, self.closed = [], [], False

    def record(self, record):
        self.records.append(record)

    def text(self, line):
        self.lines.append(line)

    def close(self):
        self.closed = True


def test_extra_sinks_receive_every_record_and_line(tmp_path):
    tracker = _Recorder()
    log = RunLog(tmp_path, echo=False, sinks=[tracker])
    log.record({"step": 1, "loss": 1.0})
    log.text("banner")
    log.close()
    assert tracker.records == [{"step": 1, "loss": 1.0}] and tracker.lines == ["banner"] and tracker.closed
    assert read_metrics(tmp_path) == tracker.records


def test_format_seconds():
    assert [format_seconds(s) for s in (-3, 0, 119.4, 120, 725, 7199, 7200, 12_000)] == \
        ["0s", "0s", "119s", "2m00s", "12m05s", "119m59s", "2h00m", "3h20m"]


# ----------------------------------------------------------------------------- plots


def test_the_plot_writer_leaves_a_png_and_no_temporary_file(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    save_figure(fig, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    assert not any(p.name.endswith(TMP_SUFFIX) for p in tmp_path.iterdir())
    assert not plt.fignum_exists(fig.number)  # closed: a long run does not pile figures up


def test_the_plot_writer_replaces_a_planted_link_without_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "plot.png").symlink_to(victim)
    fig, _ = pyplot().subplots()
    save_figure(fig, tmp_path / "plot.png")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "plot.png").is_symlink()


# ----------------------------------------------------------------------------- schedules


def _old_pretraining_lr(step: int, t: TrainConfig) -> float:
    """The formula pre-training used before schedule.py: checkpoints resume onto these exact rates."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.floor_lr
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.floor_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.floor_lr)


def _old_finetuning_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def test_warmup_cosine_values():
    peak, warmup, decay, floor = 1e-3, 10, 110, 1e-4
    assert warmup_cosine(0, peak, warmup, decay, floor) == peak / 11  # warmup starts above zero
    assert warmup_cosine(9, peak, warmup, decay, floor) == peak * 10 / 11  # and ends just below the peak
    assert warmup_cosine(10, peak, warmup, decay, floor) == peak  # where the cosine starts
    assert warmup_cosine(60, peak, warmup, decay, floor) == pytest.approx((peak + floor) / 2)  # mid-cosine
    assert floor < warmup_cosine(109, peak, warmup, decay, floor) < floor * 1.01
    assert warmup_cosine(110, peak, warmup, decay, floor) == floor  # the floor at the decay length
    assert warmup_cosine(10_000, peak, warmup, decay, floor) == floor  # and held after it
    rates = [warmup_cosine(s, peak, warmup, decay, floor) for s in range(200)]
    assert all(a < b for a, b in zip(rates[:10], rates[1:11], strict=True))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))


def test_warmup_linear_values():
    peak, warmup, decay = 6.25e-5, 4, 104
    assert warmup_linear(0, peak, warmup, decay) == peak / 4
    assert warmup_linear(3, peak, warmup, decay) == peak  # the last warmup step runs at the peak
    assert warmup_linear(4, peak, warmup, decay) == peak
    assert warmup_linear(54, peak, warmup, decay) == pytest.approx(peak / 2)
    assert warmup_linear(104, peak, warmup, decay) == 0.0
    assert warmup_linear(500, peak, warmup, decay) == 0.0
    assert warmup_linear(500, peak, warmup, decay, floor=1e-6) == 1e-6  # a floor is held too
    assert warmup_linear(0, peak, 0, decay) == peak  # no warmup: the decay starts at the peak


def test_pretraining_rates_are_exactly_those_resumed_runs_were_trained_with():
    for kw in ({}, {"lr_decay_iters": 50}, {"warmup_iters": 0}, {"min_lr": 0.0}, {"min_lr": -1.0}, {"max_iters": 7}):
        t = TrainConfig(max_iters=100, warmup_iters=8, learning_rate=3e-3, min_lr=3e-4)
        for k, v in kw.items():
            setattr(t, k, v)
        assert [lr_at(s, t) for s in range(130)] == [_old_pretraining_lr(s, t) for s in range(130)]


@pytest.mark.parametrize("total,warmup", [(375, 1), (10, 0), (1000, 2), (7, 7), (3, 5)])
def test_finetuning_rates_are_exactly_the_old_ones(total, warmup):
    new = [warmup_linear(s, 6.25e-5, warmup, total, 0.0) for s in range(total + 5)]
    assert new == [_old_finetuning_lr(s, total, warmup, 6.25e-5) for s in range(total + 5)]


# ----------------------------------------------------------------------------- optimizer groups


def _module() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.LayerNorm(5),
                            torch.nn.Linear(5, 3, bias=False))
    m[3].weight.requires_grad_(False)  # a frozen matrix belongs to no group
    return m


def test_every_trainable_parameter_is_in_exactly_one_group_and_only_matrices_decay():
    module = _module()
    decay, no_decay = optimizer_groups(module, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    trainable = [id(p) for p in module.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 3  # embedding, linear; bias, gain, bias


def test_the_gpt_and_adamw_use_the_same_groups():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = GPT(cfg)
    ours = model.optimizer_groups(0.1)
    shared = optimizer_groups(model, 0.1)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in shared]
    opt = make_adamw(model, 3e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["lr"] == 3e-3 and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is True  # the CPU has a fused AdamW kernel
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
