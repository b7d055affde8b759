"""The GPT itself: causality, parameter counts, configuration checks, both layer-norm placements;
its CPU dropout and bf16 attention (slmkit.cpu_ops): masks, seeding, hooks, agreement with SDPA."""

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import ModelConfig, preset_config
from slmkit.cpu_ops import Dropout, causal_attention, cpu_dropout, use_cpu_attention
from slmkit.errors import UserError
from slmkit.model import GPT


def small(**kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_changing_a_future_token_never_changes_earlier_logits(ln):
    torch.manual_seed(0)
    model = GPT(small(ln=ln)).eval()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 50
    lx, _ = model(x)
    ly, _ = model(y)
    assert torch.equal(lx[:, :7], ly[:, :7])
    assert not torch.allclose(lx[:, 7:], ly[:, 7:])


def test_shakespeare_char_preset_has_about_10_7m_parameters():
    cfg = preset_config("shakespeare-char").model
    cfg.vocab_size = 65
    with torch.device("meta"):
        b = GPT(cfg).param_breakdown()
    assert 10.6e6 < b.total < 10.9e6
    assert b.head == 0  # tied to the token embedding
    assert b.total == b.token_embedding + b.position_embedding + b.attention + b.mlp + b.layer_norm


def test_gpt1_preset_matches_the_released_parameter_count():
    cfg = preset_config("gpt1").model
    with torch.device("meta"):
        model = GPT(cfg)
    # The release holds 116,534,784 values; the 3 fine-tuning tokens' rows (3 x 768) are added on top.
    assert "ln_f" not in model.transformer  # post-LN: no final layer norm
    assert model.num_params() == 116_534_784 + 3 * 768


def test_tied_head_shares_storage_with_the_token_embedding():
    model = GPT(small())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=-1), "block_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(ln="middle"), "ln"),
    ],
)
def test_invalid_configurations_are_clear_errors_before_allocation(change, message):
    with pytest.raises(UserError, match=message):
        GPT(small(**change))


def test_sequence_longer_than_the_position_table_is_refused():
    model = GPT(small())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weight_decay_only_on_matrices():
    model = GPT(small())
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()


def test_cpu_dropout_keeps_the_expectation_and_masks_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(64, 256, 384, requires_grad=True)
    y = cpu_dropout(x, 0.2)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 2e-3  # ~6.3M draws: the keep rate is 0.8 to 3 decimals
    torch.testing.assert_close(y[kept], x[kept] / 0.8, rtol=1e-4, atol=1e-6)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.8, rtol=1e-4, atol=1e-6)
    # Every element is kept or dropped independently: neighbours in one 64-bit word do not correlate.
    k = kept.flatten().float()
    assert abs(((k[0::4] * k[3::4]).mean() - 0.64).item()) < 3e-3


def test_dropout_is_reproducible_from_the_seed_and_off_in_eval_mode():
    drop = Dropout(0.5)
    x = torch.ones(8, 100)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x))
    assert set(a.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_dropout_mask_in_every_float_width(dtype):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=dtype)
    y = cpu_dropout(x, 0.3)
    assert y.dtype == dtype
    values = y.unique().float().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / 0.7, rel=4e-3)]
    assert abs((y != 0).float().mean().item() - 0.7) < 3e-3


@pytest.mark.parametrize("training", [True, False])
def test_hooks_on_a_dropout_module_fire_and_can_change_its_output(training):
    drop = Dropout(0.5).train(training)
    x = torch.ones(4, 8)
    seen = []
    pre = drop.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    post = drop.register_forward_hook(lambda m, args, out: seen.append("post"))
    drop(x)
    assert seen == ["pre", "post"]
    post.remove()
    drop.register_forward_hook(lambda m, args, out: out * 0)  # a hook's return value replaces the output
    assert torch.equal(drop(x), torch.zeros(4, 8))
    pre.remove()


def test_global_module_hooks_fire_on_dropout_inside_the_model():
    model = GPT(small(dropout=0.1)).train()
    names = {m: n for n, m in model.named_modules()}
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(names.get(m)) if isinstance(m, Dropout) else None
    )
    try:
        model(torch.randint(0, 50, (2, 5)))
    finally:
        handle.remove()
    assert seen[0] == "transformer.drop"
    assert seen.count("transformer.h.1.mlp.dropout") == 1 and len(seen) == 1 + 2 * 2  # embeddings + 2 per block


def test_dropout_without_hooks_skips_module_call_machinery_and_hooks_do_not_change_the_result(monkeypatch):
    model = GPT(small(dropout=0.2)).train()
    x = torch.randint(0, 50, (2, 9))
    torch.manual_seed(3)
    plain, _ = model(x)
    calls = []
    module_call = torch.nn.Module.__call__

    def counting_call(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return module_call(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", counting_call)
    torch.manual_seed(3)
    assert torch.equal(model(x)[0], plain)
    assert "Dropout" not in calls and "Linear" in calls  # the fast path: straight to forward
    for m in model.modules():
        if isinstance(m, Dropout):
            m.register_forward_hook(lambda m, args, out: None)
    calls.clear()
    torch.manual_seed(3)
    assert torch.equal(model(x)[0], plain)  # same masks drawn, same order: hooks change nothing else
    assert calls.count("Dropout") == 1 + 2 * 2


@pytest.mark.parametrize("ln,bias", [("pre", True), ("post", False)])
def test_flops_per_token_counts_the_models_matrix_products(ln, bias):
    """budget.flops_per_token against PyTorch's own FLOP counter on a real forward and backward.
    The counter does not count the CPU flash-attention kernel, so the comparison leaves attention
    out (context 0); its 4 x n_embd x context per layer is PaLM's formula, stated in the docstring."""
    from torch.utils.flop_counter import FlopCounterMode

    from slmkit.budget import flops_per_token

    cfg = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, ln=ln, bias=bias)
    m = GPT(cfg)
    x = torch.randint(0, 50, (3, 32))
    with FlopCounterMode(display=False) as forward:
        m(x)
    with FlopCounterMode(display=False) as training:
        m(x, x)[1].backward()
    assert forward.get_total_flops() == x.numel() * flops_per_token(cfg, 0, training=False)
    assert training.get_total_flops() == x.numel() * flops_per_token(cfg, 0, training=True)


@pytest.mark.parametrize("t,d", [(12, 8), (40, 4)])
def test_cpu_causal_attention_equals_sdpa_with_the_same_gradients(t, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(causal_attention, (q, k, v))
    grad_out = torch.randn(2, 3, t, d, dtype=torch.float64)
    results = []
    for attend in (causal_attention, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        out = attend(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    for ours, sdpa in zip(*results, strict=True):
        torch.testing.assert_close(ours, sdpa, rtol=1e-10, atol=1e-10)


def test_cpu_causal_attention_in_bf16_is_as_accurate_as_sdpa_in_bf16():
    """Scores rounded to bf16 before the softmax cost some accuracy against SDPA's fp32 scores; it must
    stay within bf16's own scale (measured: 3.3e-3 against SDPA's 1.9e-3 at shakespeare-char's shape)."""
    torch.manual_seed(0)
    exact = [torch.randn(4, 2, 64, 32, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(4, 2, 64, 32, dtype=torch.float64)

    def run(attend, inputs, g):
        out = attend(*inputs)
        return [out, *torch.autograd.grad(out, inputs, g)]

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    reference = run(sdpa, exact, grad_out)
    low = [x.detach().bfloat16().requires_grad_() for x in exact]
    for attend in (causal_attention, sdpa):
        for got, want in zip(run(attend, low, grad_out.bfloat16()), reference, strict=True):
            assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_bf16_training_on_cpu_uses_the_batched_attention_and_agrees_with_sdpa(monkeypatch):
    import slmkit.model as model_module
    from slmkit.runtime import autocast

    torch.manual_seed(0)
    model = GPT(small(block_size=32, n_embd=32))
    x = torch.randint(0, 50, (4, 32))
    calls = []
    monkeypatch.setattr(model_module, "causal_attention", lambda *a: calls.append(1) or causal_attention(*a))

    def loss_and_grads():
        model.zero_grad()
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss = model(x, x)[1]
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ours = loss_and_grads()
    assert len(calls) == 2  # once per layer
    monkeypatch.setattr(model_module, "use_cpu_attention", lambda q, dropout: False)
    sdpa = loss_and_grads()
    assert len(calls) == 2
    assert ours[0] == pytest.approx(sdpa[0], rel=1e-2)
    assert F.cosine_similarity(ours[1], sdpa[1], dim=0) > 0.99


def test_batched_attention_only_where_it_is_faster_and_exact():
    q = torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16)
    assert use_cpu_attention(q, 0.0)
    assert not use_cpu_attention(q.float(), 0.0)  # fp32: the fused kernel is faster than fp32 batched products
    assert not use_cpu_attention(q, 0.1)  # attention dropout: SDPA draws it
    assert not use_cpu_attention(q[:, :, :1], 0.0)  # one query (decoding): nothing to mask
    assert use_cpu_attention(torch.zeros(1, 2, 16, 4, dtype=torch.bfloat16), 0.0)
    assert not use_cpu_attention(torch.zeros(1, 2, 17, 4, dtype=torch.bfloat16), 0.0)  # T > 4 x head_dim
