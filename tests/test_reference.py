"""The plain reference GPT is the fast GPT: same parameter names, same logits from the same weights."""

import pytest
import torch

from slmkit import reference
from slmkit.config import ModelConfig
from slmkit.model import GPT


def config(ln: str, gelu: str, bias: bool) -> ModelConfig:
    return ModelConfig(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.1,
                       ln=ln, gelu=gelu, bias=bias)


def scrambled(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, so zero biases or unit layer-norm gains cannot hide a misplaced term."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", ["tanh", "exact"])
@pytest.mark.parametrize("ln", ["pre", "post"])
def test_reference_and_fast_model_give_the_same_logits_both_ways(ln, gelu, bias):
    torch.manual_seed(0)
    cfg = config(ln, gelu, bias)
    fast = scrambled(GPT(cfg)).eval()
    plain = reference.GPT(cfg).eval()
    plain.load_state_dict(fast.state_dict())  # strict: every name and shape must match
    x = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        (lf, loss_f), (lp, loss_p) = fast(x, y), plain(x, y)
    assert lf.abs().max() > 1.0  # logits large enough for a wrong term to show
    assert (lf - lp).abs().max().item() < 1e-5
    assert abs(loss_f.item() - loss_p.item()) < 1e-5

    scrambled(plain)  # and back: reference weights into the fast model
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert (fast(x)[0] - plain(x)[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_parameter_names_and_shapes_are_the_fast_models(ln):
    cfg = config(ln, "tanh", True)
    fast, plain = GPT(cfg), reference.GPT(cfg)
    shapes = {n: p.shape for n, p in fast.state_dict().items()}
    assert {n: p.shape for n, p in plain.state_dict().items()} == shapes
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fast.named_parameters()]
    assert plain.lm_head.weight is plain.transformer.wte.weight  # tied, as in the fast model


def test_reference_is_causal_and_its_dropout_only_trains():
    torch.manual_seed(0)
    cfg = config("post", "tanh", True)
    plain = reference.GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    z = x.clone()
    z[:, 7] = (z[:, 7] + 1) % cfg.vocab_size
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x)[0][:, :7], plain(z)[0][:, :7])
        assert torch.equal(plain(x)[0], plain(x)[0])
        plain.train()
        assert not torch.equal(plain(x)[0], plain(x)[0])
