"""`slm finetune --transfer-layers N` (GPT-1 section 5, Fig. 2 left): the embeddings and the first N
blocks come from the pre-trained model, the other blocks are exactly a fresh model's (same seed)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import cli_fails

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.finetune import FinetuneConfig, FineTuned, finetune, spec_from_flags
from slmkit.finetune.loop import build_for_finetuning
from slmkit.model import GPT
from slmkit.tokenizers import CharTokenizer

ALPHABET = list(" abcdefghijklmnopqrstuvwxyz.!?,'")
N_LAYER = 3
SPEC = spec_from_flags("toy", "classification", "tsv", "text", "label", labels="0,1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pretrained(tmp_path, ln: str = "pre"):
    """A tiny char GPT checkpoint whose every tensor (layer norms included) differs from any fresh
    init: seeded init, then a random perturbation standing in for pre-training."""
    base = CharTokenizer(ALPHABET)
    cfg = RunConfig()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size, m.ln = N_LAYER, 2, 32, 24, 0.0, len(
        ALPHABET), ln
    torch.manual_seed(123)
    gpt = GPT(m)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"base-{ln}.safetensors"
    save_checkpoint(path, gpt, cfg, base, {"step": 0})
    return path


def start(path, **kw) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the fine-tuning model's starting state, the pre-trained state) for FinetuneConfig(**kw)."""
    ckpt = load_checkpoint(path)
    pre = {k: v.clone() for k, v in ckpt.model_state().items()}
    model, _ = build_for_finetuning(ckpt, SPEC, FinetuneConfig(**kw))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, pre


def fresh_state(path, seed: int) -> dict[str, torch.Tensor]:
    """What `slm train` (torch.manual_seed(seed); GPT(config)) starts from, for the same config."""
    mcfg = copy.deepcopy(load_checkpoint(path).config.model)
    torch.manual_seed(seed)
    return GPT(mcfg).state_dict()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def block_keys(state, i: int) -> list[str]:
    return [k for k in state if k.startswith(f"transformer.h.{i}.")]


def test_all_layers_is_the_pretrained_model_and_the_default_bit_for_bit(tmp_path):
    path = pretrained(tmp_path)
    full, pre = start(path, transfer_layers=N_LAYER)
    default, _ = start(path)
    n_old = len(ALPHABET)
    for k, v in pre.items():  # every pre-trained tensor, the grown embedding's old rows included
        got = full[f"gpt.{k}"]
        assert same(got[:n_old] if k == "transformer.wte.weight" else got, v), k
    assert full.keys() == default.keys()
    assert all(same(full[k], default[k]) for k in full), "N = n_layer must be today's fine-tuning exactly"


@pytest.mark.parametrize("ln, k", [("pre", 0), ("pre", 1), ("pre", 2), ("post", 1)])
def test_first_k_blocks_transferred_the_rest_a_fresh_init(tmp_path, ln, k):
    path = pretrained(tmp_path, ln)
    got, pre = start(path, transfer_layers=k, seed=5)
    fresh, other_seed = fresh_state(path, 5), fresh_state(path, 6)
    random_init, _ = start(path, random_init=True, seed=5)
    n_old = len(ALPHABET)
    assert same(got["gpt.transformer.wte.weight"][:n_old], pre["transformer.wte.weight"])
    assert same(got["gpt.transformer.wpe.weight"], pre["transformer.wpe.weight"])
    if ln == "pre":  # the final layer norm is kept with the embeddings
        assert same(got["gpt.transformer.ln_f.weight"], pre["transformer.ln_f.weight"])
        assert same(got["gpt.transformer.ln_f.bias"], pre["transformer.ln_f.bias"])
    for i in range(N_LAYER):
        keys = block_keys(pre, i)
        assert keys
        for key in keys:
            if i < k:
                assert same(got[f"gpt.{key}"], pre[key]), key
            else:
                assert not torch.equal(got[f"gpt.{key}"], pre[key]), key
                assert same(got[f"gpt.{key}"], fresh[key]), key  # exactly fresh training's init, seed 5
                assert same(got[f"gpt.{key}"], random_init[f"gpt.{key}"]), key  # and --random-init's
                if pre[key].dim() == 2:  # the random ones (biases start at 0, layer norms at 1 and 0)
                    assert not torch.equal(got[f"gpt.{key}"], other_seed[key]), key
    # The head (and the grown special-token rows) start as with every layer transferred.
    default, _ = start(path, seed=5)
    for key in ("head.weight", "head.bias", "gpt.transformer.wte.weight"):
        assert same(got[key], default[key]), key


def test_reinitialised_blocks_are_reproducible(tmp_path):
    path = pretrained(tmp_path)
    a, _ = start(path, transfer_layers=1, seed=3)
    b, _ = start(path, transfer_layers=1, seed=3)
    assert all(same(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n", [N_LAYER + 1, -1, 100])
def test_bad_transfer_layers_is_one_line_naming_n_layer(tmp_path, capsys, n):
    path = pretrained(tmp_path)
    rows = "text\tlabel\nabc\t1\nxyz\t0\n"
    (tmp_path / "t.tsv").write_text(rows)
    out = tmp_path / "ft"
    line = cli_fails(["finetune", "--from", path, "--task", "toy", "--family", "classification", "--columns",
                      "text", "--label-column", "label", "--labels", "0,1", "--train", tmp_path / "t.tsv",
                      "--dev", tmp_path / "t.tsv", "--out-dir", out, "--transfer-layers", n, "--quiet",
                      "--device", "cpu"], capsys)
    assert f"0..{N_LAYER}" in line and f"n_layer {N_LAYER}" in line and str(n) in line
    assert not out.exists()  # refused before anything was written


def test_transfer_layers_with_random_init_or_not_an_integer_is_refused():
    with pytest.raises(UserError, match="--random-init"):
        FinetuneConfig(transfer_layers=1, random_init=True).validate()
    with pytest.raises(UserError, match="whole number"):
        FinetuneConfig.from_dict({"transfer_layers": 1.5}).validate()


def _toy_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 32), ("dev", 16)):
        rows = []
        for i in range(n):
            letters = "abcdef" if i % 2 else "stuvwxyz"
            rows.append(f"{''.join(rng.choice(list(letters), size=4))}\t{i % 2}\n")
        paths[split] = tmp_path / f"{split}.tsv"
        paths[split].write_text("text\tlabel\n" + "".join(rows))
    return paths


def test_the_setting_is_recorded_and_the_run_evaluates(tmp_path, capsys):
    from slmkit.cli import main

    path = pretrained(tmp_path)
    paths = _toy_files(tmp_path)
    out = tmp_path / "ft1"
    main(["finetune", "--from", str(path), "--task", "toy", "--family", "classification", "--columns", "text",
          "--label-column", "label", "--labels", "0,1", "--train", str(paths["train"]), "--dev", str(paths["dev"]),
          "--out-dir", str(out), "--epochs", "1", "--batch-size", "16", "--transfer-layers", "1", "--quiet",
          "--device", "cpu", "--dtype", "float32"])
    capsys.readouterr()
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["transfer_layers"] == 1 and summary["config"]["transfer_layers"] == 1
    assert summary["n_layer"] == N_LAYER
    ft = FineTuned.load(out)
    assert ft.info["transfer_layers"] == 1 and ft.info["config"]["transfer_layers"] == 1
    assert FinetuneConfig.from_dict(ft.info["config"]).transfer_layers == 1
    assert "first 1 of 3 blocks" in (out / "log.txt").read_text()
    main(["evaluate", "--run", str(out), "--data", str(paths["dev"]), "--json"])
    assert json.loads(capsys.readouterr().out)["examples"] == 16

    # The default records that every layer was transferred.
    cfg = FinetuneConfig(epochs=1, batch_size=16, device="cpu", dtype="float32")
    finetune(path, SPEC, paths["train"], paths["dev"], tmp_path / "ft-all", cfg, progress=False)
    summary = json.loads((tmp_path / "ft-all" / "finetune.json").read_text())
    assert summary["transfer_layers"] == N_LAYER and summary["config"]["transfer_layers"] is None
    assert "re-initialised" not in (tmp_path / "ft-all" / "log.txt").read_text()
