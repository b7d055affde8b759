"""Generation: KV cache equivalence, sampling filters, stop strings, end of text, streaming."""

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.cpu_ops import Int8Linear, PackedLinear, can_prepack, can_quantize_int8
from slmkit.generate import GenerationConfig, filter_logits, generate_ids, generate_stream
from slmkit.inference import DecodeStep, decoding_model
from slmkit.model import GPT
from slmkit.tokenizers import CharTokenizer, HFByteLevelTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(cfg).eval()


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_greedy_with_kv_cache_equals_without_it_token_for_token(ln):
    torch.manual_seed(1)
    m = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, ln=ln)).eval()
    prompt = [3, 1, 4, 1, 5]
    n = 50  # well past the 16-token context: the cache is cropped and rebuilt
    cached = list(generate_ids(m, prompt, GenerationConfig(max_new_tokens=n, temperature=0), "cpu"))
    plain = list(generate_ids(m, prompt, GenerationConfig(max_new_tokens=n, temperature=0, use_cache=False), "cpu"))
    assert cached == plain and len(cached) == n


def test_cached_logits_match_full_forward(model):
    x = torch.randint(0, 40, (1, 12))
    full, _ = model(x)
    cache = model.new_cache()
    first, _ = model(x[:, :7], cache=cache)
    rest = [model(x[:, i : i + 1], cache=cache)[0] for i in range(7, 12)]
    stepwise = torch.cat([first, *rest], dim=1)
    assert torch.allclose(full, stepwise, atol=1e-5)


@pytest.mark.skipif(not can_prepack(torch.float32), reason="this torch build has no oneDNN linear")
def test_decoding_model_is_packed_matches_the_model_and_follows_weight_changes():
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    x = torch.randint(0, 40, (2, 12))
    fast = decoding_model(model, torch.device("cpu"), torch.float32)
    assert fast is not model and isinstance(fast.transformer.h[0].mlp.c_fc, PackedLinear)
    torch.testing.assert_close(fast(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    assert decoding_model(model, torch.device("cpu"), torch.float32) is fast  # cached
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)  # as an optimizer step would
    fresh = decoding_model(model, torch.device("cpu"), torch.float32)
    assert fresh is not fast
    torch.testing.assert_close(fresh(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="no bf16 oneDNN linear on this CPU")
def test_bf16_decoding_stays_close_to_fp32(model):
    x = torch.randint(0, 40, (1, 12))
    fast = decoding_model(model, torch.device("cpu"), torch.bfloat16)
    assert fast.transformer.wte.weight.dtype == torch.bfloat16
    cache = fast.new_cache(torch.float32)
    stepwise = torch.cat([fast(x[:, :6], cache=cache)[0], *(fast(x[:, i : i + 1], cache=cache)[0]
                                                           for i in range(6, 12))], dim=1)
    assert (stepwise.float() - model(x)[0]).abs().max().item() < 0.05


def _stepwise_logits(fast, x, prefill: int, step=None):
    """Logits of the tokens of x after the first `prefill`, one token at a time through the cache."""
    cache = fast.new_cache(torch.float32)
    fast(x[:, :prefill], cache=cache)
    if step is None:
        return torch.cat([fast(x[:, i : i + 1], cache=cache)[0][0] for i in range(prefill, x.shape[1])])
    assert step.can_take(cache)
    return torch.cat([step(int(x[0, i]), cache) for i in range(prefill, x.shape[1])])


@pytest.mark.skipif(not can_prepack(torch.float32), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("ln,gelu,bias", [("pre", "exact", True), ("post", "tanh", True), ("pre", "tanh", False)])
def test_decode_step_computes_what_the_model_computes(ln, gelu, bias):
    torch.manual_seed(2)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, ln=ln, gelu=gelu,
                            bias=bias)).eval()
    fast = decoding_model(model, torch.device("cpu"), torch.float32)
    assert DecodeStep.fits(fast) and not DecodeStep.fits(model)  # the model's own nn.Linears: no step
    x = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        expected = model(x)[0][0, 5:]
        torch.testing.assert_close(_stepwise_logits(fast, x, 5, DecodeStep(fast)), expected, rtol=1e-5, atol=1e-5)
        cache = fast.new_cache(torch.float32)
        fast(x, cache=cache)
        assert not DecodeStep(fast).can_take(cache)  # the context is full: the window must slide first


@pytest.mark.skipif(not can_quantize_int8(torch.device("cpu")), reason="no int8 weight kernel in this torch")
def test_int8_decode_step_matches_the_int8_model(model):
    fast = decoding_model(model, torch.device("cpu"), torch.float32, "int8")
    x = torch.randint(0, 40, (1, 14))
    with torch.no_grad():
        by_model = _stepwise_logits(fast, x, 4).float()
        by_step = _stepwise_logits(fast, x, 4, DecodeStep(fast)).float()
    # The same int8 products in bf16; the step only adds the residual inside the linear's rounding.
    assert (by_step - by_model).abs().max().item() < 0.05


def test_generation_takes_the_decode_step_for_single_tokens(monkeypatch):
    torch.manual_seed(3)
    m = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    calls = []
    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, tok, cache: calls.append(tok) or real(self, tok, cache))
    out = list(generate_ids(m, [1, 2, 3], GenerationConfig(max_new_tokens=30, temperature=0), "cpu"))
    if not can_prepack(torch.float32):
        pytest.skip("no oneDNN linear: fp32 decoding uses the model itself")
    # 30 tokens from a 3-token prompt in a 16-token context slide twice (by 8): 3 prefills, the rest steps.
    assert len(out) == 30 and len(calls) == 27


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [True, True, False, False]
    p = filter_logits(logits, top_k=0, top_p=0.75)  # 0.5 + 0.3 reach 0.75
    assert torch.isfinite(p).tolist() == [True, True, False, False]
    p_small = filter_logits(logits, top_k=0, top_p=0.1)  # the most likely token always stays
    assert torch.isfinite(p_small).tolist() == [True, False, False, False]


def test_sampling_draws_from_the_renormalised_top_k_and_top_p():
    from slmkit.generate import next_token

    probs = torch.tensor([0.05, 0.4, 0.02, 0.3, 0.2, 0.03])
    rng = torch.Generator().manual_seed(0)
    n = 4000
    for gen, kept in [(GenerationConfig(temperature=1.0, top_k=3), {1: 0.4, 3: 0.3, 4: 0.2}),
                      (GenerationConfig(temperature=1.0, top_k=4, top_p=0.65), {1: 0.4, 3: 0.3})]:
        draws = [next_token(probs.log(), gen, rng) for _ in range(n)]
        assert set(draws) == set(kept)
        total = sum(kept.values())
        for tid, p in kept.items():  # within 4 standard deviations of the renormalised probability
            q = p / total
            assert abs(draws.count(tid) / n - q) < 4 * (q * (1 - q) / n) ** 0.5


def test_seeded_sampling_is_reproducible(model):
    gen = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=10, seed=7)
    a = list(generate_ids(model, [1, 2], gen, "cpu", rng=torch.Generator().manual_seed(7)))
    b = list(generate_ids(model, [1, 2], gen, "cpu", rng=torch.Generator().manual_seed(7)))
    assert a == b


class AlwaysNext(torch.nn.Module):
    """A stand-in model that always predicts a fixed sequence of tokens."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.i = list(script), vocab, 0
        self.config = ModelConfig(vocab_size=vocab, block_size=64)

    def new_cache(self, dtype=None):
        return GPT.new_cache(self, dtype)

    def forward(self, x, cache=None, last_only=False):
        if cache is not None:
            cache.length += x.size(1)
        logits = torch.full((1, 1, self.vocab), -10.0)
        logits[0, 0, self.script[min(self.i, len(self.script) - 1)]] = 10.0
        self.i += 1
        return logits, None


def test_end_of_text_token_ends_the_sample():
    tok = HFByteLevelTokenizer.train(iter(["abc abc abc " * 20]), vocab_size=270)
    eot = tok.special["eot"]
    script = tok.encode("abc") + [eot] + tok.encode("never")
    out = "".join(generate_stream(AlwaysNext(script, tok.vocab_size), tok, prompt="x",
                                  gen=GenerationConfig(max_new_tokens=20, temperature=0)))
    assert out == "abc"


def test_stop_strings_end_the_sample_and_are_not_printed():
    tok = CharTokenizer.train("abcdefgh:\n ")
    script = tok.encode("abc\n\nd:efgh")
    pieces = list(generate_stream(AlwaysNext(script, tok.vocab_size), tok, prompt="a",
                                  gen=GenerationConfig(max_new_tokens=30, temperature=0, stop=("\n\n", ":"))))
    assert "".join(pieces) == "abc"


def test_streaming_yields_whole_characters_for_multibyte_text():
    tok = HFByteLevelTokenizer.train(iter(["ascii " * 50]), vocab_size=262)
    script = tok.encode("né ✓ 日")
    pieces = list(generate_stream(AlwaysNext(script, tok.vocab_size), tok, prompt="a",
                                  gen=GenerationConfig(max_new_tokens=len(script), temperature=0)))
    assert "".join(pieces) == "né ✓ 日"
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3


@pytest.mark.skipif(not can_quantize_int8(torch.device("cpu")), reason="this torch has no int8 weight kernel")
def test_int8_linear_is_within_a_percent_of_the_float_one():
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536)
    x = torch.randn(4, 3, 384)
    q = Int8Linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    ref = linear(x)
    got = q(x)
    assert got.shape == ref.shape
    assert ((got.float() - ref).norm() / ref.norm()).item() < 0.01
