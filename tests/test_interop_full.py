"""Full-size parity (GPT-2 124M, GPT-1 117M) against independent code, on real text. Marked slow, part of CI.

The original GPT-1 release format is checked two ways: against HF's OpenAIGPTLMHeadModel with the
release arrays mapped in by hand (always), and against HF's own `load_tf_weights_in_openai_gpt`, which
exists only in transformers<5, run in the interpreter named by SLMKIT_TRANSFORMERS4_PYTHON (a venv
with `pip install "transformers<5"`; skipped when unset).
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from interop_helpers import text_batch, write_release
from test_interop import greedy_hf, greedy_ours, hand_mapped_hf_gpt1, hf_logits, our_logits

from slmkit.checkpoint import load_model
from slmkit.interop import import_hf, import_openai_gpt1

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_gpt2_124m_parity_and_greedy(tmp_path):
    from test_interop import gpt2_vocab

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M configuration
    hf.save_pretrained(tmp_path / "hf")
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (tmp_path / "hf" / dst).write_bytes((gpt2_vocab() / src).read_bytes())
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, ckpt = load_model(tmp_path / "run")
    assert ckpt.config.preset == "gpt2-124m" and model.num_params() == 124_439_808
    batch = text_batch(tok, rows=2, length=128)
    diff = (hf_logits(hf, batch) - our_logits(model, batch)).abs().max().item()
    print(f"gpt2-124m max abs logit diff vs GPT2LMHeadModel: {diff:.3g}")
    assert diff < 1e-4, diff
    assert greedy_hf(hf, batch[0][:16]) == greedy_ours(model, batch[0][:16])


def test_openai_gpt_117m_parity(tmp_path):
    """(Greedy generation with HF's openai-gpt, which has no KV cache, is compared at the tiny size.)"""
    from test_interop import gpt1_vocab

    torch.manual_seed(0)
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig()).eval()  # 40478 tokens, 512 positions
    hf.save_pretrained(tmp_path / "hf")
    for src, dst in (("encoder_bpe_40000.json", "vocab.json"), ("vocab_40000.bpe", "merges.txt")):
        (tmp_path / "hf" / dst).write_bytes((gpt1_vocab() / src).read_bytes())
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, ckpt = load_model(tmp_path / "run")
    assert ckpt.config.preset == "gpt1" and ckpt.config.model.vocab_size == 40481
    batch = text_batch(tok, rows=2, length=128)
    diff = (hf_logits(hf, batch) - our_logits(model, batch)[..., :40478]).abs().max().item()
    print(f"openai-gpt 117m max abs logit diff vs OpenAIGPTLMHeadModel: {diff:.3g}")
    assert diff < 1e-4, diff


V4_SCRIPT = textwrap.dedent("""
    import sys, json, numpy as np, torch
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    from transformers.models.openai.modeling_openai import load_tf_weights_in_openai_gpt
    folder, batch_file, out = sys.argv[1:]
    config = OpenAIGPTConfig()
    model = OpenAIGPTLMHeadModel(config).eval()
    load_tf_weights_in_openai_gpt(model.transformer, config, folder)
    model.tie_weights()
    with torch.no_grad():
        logits = model(torch.tensor(json.load(open(batch_file)))).logits
    np.save(out, logits.numpy())
""")


def test_release_format_full_size(tmp_path):
    arrays = write_release(tmp_path / "rel")  # 146 tensors, 116,534,784 float32 values in 10 files
    assert sum(a.size for a in arrays) == 116_534_784
    import_openai_gpt1(tmp_path / "rel", tmp_path / "run")
    model, tok, ckpt = load_model(tmp_path / "run")
    assert ckpt.config.preset == "gpt1" and ckpt.config.model.ln == "post"
    assert tok.special == {"start": 40478, "delim": 40479, "extract": 40480}
    batch = text_batch(tok, rows=2, length=128)
    ours = our_logits(model, batch)[..., :40478]
    del model
    hf = hand_mapped_hf_gpt1(arrays, n_ctx=512, n_embd=768, n_layer=12, n_head=12)
    diff = (hf_logits(hf, batch) - ours).abs().max().item()
    print(f"release format: max abs logit diff vs hand-mapped OpenAIGPTLMHeadModel: {diff:.3g}")
    assert diff < 1e-4, diff
    del hf, arrays
    python = os.environ.get("SLMKIT_TRANSFORMERS4_PYTHON")
    if not python:
        pytest.skip("set SLMKIT_TRANSFORMERS4_PYTHON to a python with transformers<5 to also compare against "
                    "load_tf_weights_in_openai_gpt")
    import json

    (tmp_path / "batch.json").write_text(json.dumps(batch))
    r = subprocess.run([python, "-c", V4_SCRIPT, str(tmp_path / "rel"), str(tmp_path / "batch.json"),
                        str(tmp_path / "v4.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    diff4 = np.abs(np.load(tmp_path / "v4.npy") - ours.numpy()).max()
    print(f"release format: max abs logit diff vs load_tf_weights_in_openai_gpt (transformers<5): {diff4:.3g}")
    assert diff4 < 1e-4, diff4
