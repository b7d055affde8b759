"""`slm export --format gguf`: the file read back with gguf's own reader, the one-line refusals, and
(when llama-cpp-python is installed: pip install 'slmkit[llama]') llama.cpp itself running the file:
its tokenization, its logits and its greedy continuation against ours."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_fails, shared_file, tiny_config

from slmkit.checkpoint import load_model
from slmkit.cli import main
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.generate import GenerationConfig, generate_ids
from slmkit.model import GPT

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'slmkit[gguf]')")

from slmkit.interop.gguf import export_gguf, tensor_plan  # noqa: E402  (needs gguf only at call time)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGIT_TOL = 1e-3
GREEDY_TOKENS = 50
# Beyond the Shakespeare paragraph: what tokenizers get wrong (numbers, non-ASCII, runs of spaces,
# contractions, trailing whitespace).
TRICKY = ["It's 2024: 12,345 ducats  —  café, naïve, 東京 😀\n\n\n  indented\tand trailing  ",
          "we'll   've 'S 'LL\r\n \n x", "", " ", "\n", "a" * 300]


def shakespeare_paragraph() -> str:
    text = shared_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    return text[:600]


def random_run(out: Path, tokenizer, *, bias: bool = True, ln: str = "pre", gelu: str = "tanh",
               block_size: int = 512, n_embd: int = 64, seed: int = 0) -> Path:
    """A run directory holding a freshly initialised GPT (GPT-2's init: matrices N(0, 0.02)) whose biases
    and norms are perturbed too, so that a misplaced tensor shows; written the way `slm import` writes one."""
    from slmkit.interop.common import write_run

    cfg = RunConfig()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size = 2, 4, n_embd, block_size
    m.vocab_size, m.ln, m.gelu, m.bias, m.dropout = tokenizer.vocab_size, ln, gelu, bias, 0.0
    cfg.data.tokenizer = tokenizer.kind
    torch.manual_seed(seed)
    model = GPT(m)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    write_run(out, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, cfg, tokenizer,
              {"format": "random"})
    return out


def gpt2_tokenizer():
    from slmkit.tokenizers import named_tokenizer

    shared_file("vocab", "gpt2", "encoder.json")
    return named_tokenizer("gpt2", str(shared_file("vocab", "gpt2")))


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    return random_run(tmp_path_factory.mktemp("gpt2") / "run", gpt2_tokenizer())


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE of 512 tokens learned on Shakespeare: files small enough to read back quickly
    (gguf's reader takes seconds over GPT-2's 50,257 token strings)."""
    from slmkit.tokenizers.bpe import HFByteLevelTokenizer

    text = shared_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:100_000]
    return HFByteLevelTokenizer.train(iter(text.splitlines(keepends=True)), vocab_size=512)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_tokenizer) -> Path:
    return random_run(tmp_path_factory.mktemp("small") / "run", small_tokenizer)


@pytest.fixture(scope="module")
def small_run_no_bias(tmp_path_factory, small_tokenizer) -> Path:
    return random_run(tmp_path_factory.mktemp("nobias") / "run", small_tokenizer, bias=False, seed=1)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A trained run with a byte-level BPE learned on Shakespeare."""
    from slmkit.train import train

    d = tmp_path_factory.mktemp("bpe")
    corpus = d / "corpus.txt"
    corpus.write_text(shared_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:200_000],
                      encoding="utf-8")
    cfg = tiny_config(corpus, max_iters=30, eval_interval=30, sample_tokens=0)
    cfg.model.block_size, cfg.model.ln = 512, "pre"
    cfg.data.tokenizer, cfg.data.bpe_vocab_size = "bpe", 1024
    train(cfg, d / "run", overwrite=True, progress=False)
    return d / "run"


def fields(path: Path) -> tuple[dict, dict]:
    """The file's metadata (key -> value) and tensors (name -> ReaderTensor), read by gguf's reader."""
    r = gguf.GGUFReader(path)
    return {k: field_value(f) for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def field_value(f):
    """A metadata value (ReaderField.contents() from gguf 0.16 on, decoded by hand before)."""
    if hasattr(f, "contents"):
        return f.contents()
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    items = [bytes(f.parts[i]).decode("utf-8") if f.types[-1] == string else f.parts[i].tolist()[0] for i in f.data]
    return items if f.types[0] == array else items[0]


# ----------------------------------------------------------------------------- the file, read back


def test_f32_file_reads_back_with_the_metadata_llama_cpp_needs(gpt2_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    main(["export", "--run", str(gpt2_run), "--format", "gguf", "--out", str(out)])
    assert "GGUF for llama.cpp" in capsys.readouterr().out
    kv, tensors = fields(out)
    model, tok, ckpt = load_model(gpt2_run)
    m = ckpt.config.model
    assert kv["general.architecture"] == "gpt2"
    assert kv["gpt2.context_length"] == m.block_size == 512
    assert kv["gpt2.embedding_length"] == 64
    assert kv["gpt2.feed_forward_length"] == 256
    assert kv["gpt2.block_count"] == 2
    assert kv["gpt2.attention.head_count"] == 4
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(m.layer_norm_epsilon)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == [t for t, _ in sorted(tok.encoder.items(), key=lambda kv: kv[1])]
    assert kv["tokenizer.ggml.merges"] == tok.merges
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 50256
    types = kv["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    # every tensor of llama.cpp's gpt2 list, and nothing else (the head is tied: no `output`)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2] for i in (0, 1)}
    names = set(tensors)
    assert {n.rsplit(".", 1)[0] for n in names} == allowed - {"output"}
    assert "output.weight" not in names and len(names) == 4 + 2 * 12
    state = model.state_dict()
    for ours, theirs, shape in tensor_plan(m):
        t = tensors[theirs]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(shape[::-1])  # GGUF lists dimensions innermost first
        assert np.array_equal(np.asarray(t.data).reshape(shape), state[ours].numpy()), theirs


@pytest.mark.parametrize("dtype,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_smaller_types_keep_norms_biases_and_positions_in_f32(small_run, tmp_path, dtype, qtype):
    out = export_gguf(small_run, tmp_path / "m.gguf", dtype=dtype)
    kv, tensors = fields(out)
    model, _, ckpt = load_model(small_run)
    state = model.state_dict()
    want = getattr(gguf.GGMLQuantizationType, qtype)
    assert kv["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    for ours, theirs, shape in tensor_plan(ckpt.config.model):
        t = tensors[theirs]
        matrix = len(shape) == 2 and theirs != "position_embd.weight"
        assert t.tensor_type == (want if matrix else gguf.GGMLQuantizationType.F32), theirs
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        err = np.abs(back - state[ours].numpy()).max()
        assert err <= (0.0 if not matrix else 2e-3), (theirs, err)  # weights are ~N(0, 0.02)


def test_a_model_without_biases_gets_zero_biases(small_run_no_bias, tmp_path):
    out = export_gguf(small_run_no_bias, tmp_path / "m.gguf")
    _, tensors = fields(out)
    for name in ("blk.0.attn_qkv.bias", "blk.1.ffn_down.bias", "blk.0.attn_norm.bias", "output_norm.bias"):
        assert not np.asarray(tensors[name].data).any(), name
    assert np.asarray(tensors["blk.0.attn_norm.weight"].data).any()


def test_q8_0_falls_back_to_f16_for_rows_not_made_of_32_blocks(tmp_path):
    from slmkit.tokenizers.bpe import HFByteLevelTokenizer

    tok = HFByteLevelTokenizer.train(iter(["the cat sat on the mat\n"] * 50), vocab_size=300)
    # rows of 48 do not split into blocks of 32 (llama.cpp's converter falls back to f16 the same way)
    run = random_run(tmp_path / "run", tok, block_size=16, n_embd=48)
    _, tensors = fields(export_gguf(run, tmp_path / "m.gguf", dtype="q8_0"))
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 192 do


def test_vocabulary_pads_to_the_embedding_and_marks_fine_tuning_tokens(small_tokenizer):
    from slmkit.interop.gguf import CONTROL, NORMAL, UNUSED, vocabulary
    from slmkit.tokenizers.base import DELIM, START
    from slmkit.tokenizers.specials import WithSpecialsTokenizer

    base = gpt2_tokenizer()  # no start / delimiter tokens of its own: fine-tuning appends them
    n = base.vocab_size
    grown = WithSpecialsTokenizer(base, n + 2, [START, DELIM])  # two padding rows, then the two tokens
    tokens, types, merges, eot = vocabulary(grown, n + 8)
    assert len(tokens) == len(types) == n + 8
    assert eot == 50256 and tokens[eot] == "<|endoftext|>" and types[eot] == CONTROL
    assert tokens[n + 2 : n + 4] == [START, DELIM] and types[n + 2 : n + 4] == [CONTROL, CONTROL]
    assert types[n : n + 2] == [UNUSED, UNUSED] and set(types[n + 4 :]) == {UNUSED}
    assert NORMAL in types and merges and all(" " in m for m in merges)
    with pytest.raises(UserError, match="only 10 rows"):
        vocabulary(small_tokenizer, 10)


# ----------------------------------------------------------------------------- refusals


def test_post_ln_model_is_refused_with_one_line(tmp_path, capsys):
    run = random_run(tmp_path / "run", gpt2_tokenizer(), ln="post", block_size=16)
    out = tmp_path / "m.gguf"
    cli_fails(["export", "--run", run, "--format", "gguf", "--out", out], capsys, match="post-LN.*GPT-1")
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_exact_gelu_model_is_refused(tmp_path, capsys):
    run = random_run(tmp_path / "run", gpt2_tokenizer(), gelu="exact", block_size=16)
    cli_fails(["export", "--run", run, "--format", "gguf", "--out", tmp_path / "m.gguf"], capsys, match="tanh GELU")
    assert not (tmp_path / "m.gguf").exists()


def test_char_run_is_refused(tmp_path, tiny_corpus, capsys):
    from slmkit.train import train

    cfg = tiny_config(tiny_corpus, max_iters=2, eval_interval=2, sample_tokens=0)
    cfg.model.ln = "pre"
    train(cfg, tmp_path / "run", progress=False)
    cli_fails(["export", "--run", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "m.gguf"], capsys,
              match="cannot represent this run's char tokenizer")
    assert not (tmp_path / "m.gguf").exists()


def test_gpt1_tokenizer_is_refused(tmp_path, capsys):
    from slmkit.tokenizers import named_tokenizer

    shared_file("vocab", "gpt1", "encoder_bpe_40000.json")
    run = random_run(tmp_path / "run", named_tokenizer("gpt1", str(shared_file("vocab", "gpt1"))), block_size=16)
    cli_fails(["export", "--run", run, "--format", "gguf", "--out", tmp_path / "m.gguf"], capsys,
              match="gpt1 tokenizer")


def test_existing_files_are_refused_and_only_ours_replaced(small_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("the user's notes\n")
    argv = ["export", "--run", small_run, "--format", "gguf", "--out", out]
    cli_fails(argv, capsys, match="already exists; pass --overwrite")
    cli_fails([*argv, "--overwrite"], capsys, match="not a GGUF file slmkit exported")
    assert out.read_text() == "the user's notes\n"
    # a GGUF file some other tool wrote is not ours either
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = out.read_bytes()
    cli_fails([*argv, "--overwrite"], capsys, match="not a GGUF file slmkit exported")
    assert out.read_bytes() == before
    # ours: replaced with --overwrite, atomically (no temporary left beside it)
    out.unlink()
    main([*map(str, argv)])
    main([*map(str, argv), "--overwrite", "--dtype", "f16"])
    assert fields(out)[1]["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    capsys.readouterr()
    (tmp_path / "d.gguf").mkdir()
    cli_fails([*argv[:-1], tmp_path / "d.gguf"], capsys, match="is a directory")
    (tmp_path / "link.gguf").symlink_to(out)
    cli_fails([*argv[:-1], tmp_path / "link.gguf", "--overwrite"], capsys, match="symbolic link")


def test_flags_of_the_other_format_are_refused(gpt2_run, tmp_path, capsys):
    cli_fails(["export", "--run", gpt2_run, "--format", "gguf", "--out", tmp_path / "m.gguf", "--no-tokenizer"],
              capsys, match="always carries its tokenizer")
    cli_fails(["export", "--run", gpt2_run, "--out", tmp_path / "hf", "--dtype", "q8_0"], capsys,
              match="--dtype is for --format gguf")
    with pytest.raises(UserError, match="one of f32"):
        export_gguf(gpt2_run, tmp_path / "m.gguf", dtype="q4_0")


# ----------------------------------------------------------------------------- llama.cpp itself


# Decided before any fixture is built: without llama.cpp there is nothing to train a model for.
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install 'slmkit[llama]'; it "
                                            "builds llama.cpp from source)")


def open_llama(path: Path, n_ctx: int):
    """llama.cpp on the file, as exact as it goes: f32 KV cache, no flash attention, one thread."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           n_threads=1, n_threads_batch=1, type_k=0, type_v=0, flash_attn=False, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def agreement(run: Path, tmp_path: Path) -> dict:
    model, tok, ckpt = load_model(run)
    path = export_gguf(run, tmp_path / "m.gguf")
    llm = open_llama(path, ckpt.config.model.block_size)
    text = shakespeare_paragraph()
    ids = tok.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    for s in TRICKY:
        assert llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) == tok.encode(s), repr(s)
        if s:
            assert llm.detokenize(tok.encode(s)).decode("utf-8") == s
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    theirs = llama_logits(llm, ids)
    delta = float(np.abs(ours - theirs).max())
    assert delta < LOGIT_TOL, delta
    prompt = ids[:64]
    gen = GenerationConfig(max_new_tokens=GREEDY_TOKENS, temperature=0, stop_at_eot=False)
    want = list(generate_ids(model, prompt, gen, torch.device("cpu"), torch.float32))
    assert llama_greedy(llm, prompt, GREEDY_TOKENS) == want
    return {"tokens": len(ids), "max_abs_logit_delta": delta, "logit_scale": float(np.abs(ours).max())}


@needs_llama_cpp
def test_llama_cpp_agrees_on_a_gpt2_tokenizer_model(gpt2_run, tmp_path):
    print(agreement(gpt2_run, tmp_path))


@needs_llama_cpp
def test_llama_cpp_agrees_on_a_model_without_biases(small_run_no_bias, tmp_path):
    print(agreement(small_run_no_bias, tmp_path))


@needs_llama_cpp
def test_llama_cpp_agrees_on_a_trained_bpe_model(bpe_run, tmp_path):
    print(agreement(bpe_run, tmp_path))


@needs_llama_cpp
@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_llama_cpp_runs_the_smaller_types(small_run, tmp_path, dtype, tol):
    model, tok, ckpt = load_model(small_run)
    llm = open_llama(export_gguf(small_run, tmp_path / "m.gguf", dtype=dtype), ckpt.config.model.block_size)
    ids = tok.encode(shakespeare_paragraph())
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    theirs = llama_logits(llm, ids)
    # rounding the weights moves the logits a little (measured: 2.5e-4 f16, 1.9e-3 bf16, 5.9e-3 q8_0, on
    # logits up to 0.53), and the top token almost nowhere
    assert np.abs(ours - theirs).max() < tol
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95
