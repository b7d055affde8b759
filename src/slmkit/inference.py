"""A model prepared for decoding: weights cast once to the inference dtype and, on CPU, prepacked
for oneDNN, or quantized to int8.

Generating one token reads every weight once, so batch-1 decoding is bound by how fast the
matrix-vector products stream their weights. Two things make them faster on CPU:

- casting the weights once, instead of autocast re-casting all of them at every token;
- prepacking each weight in oneDNN's blocked layout (`slmkit.cpu_ops.PackedLinear`).

`weights="int8"` goes further: weight-only int8 with one scale per output channel and bf16
activations (`slmkit.cpu_ops.Int8Linear`), half the bytes to stream. It is opt-in because it
changes the numbers a little. The README ("Generation", "Inference precision") measures both.

The prepared copy is cached per model and rebuilt when the model's weights change (training,
loading), so it is safe to generate between training steps.

`DecodeStep` then takes each new token through the prepared copy with as few operations as the
arithmetic allows. At shakespeare-char size the weights stream in about half a millisecond, and
GPT.forward's general path (modules, views, masks, separate GELU and residual additions) cost as
much again; the step does the same arithmetic in about a third of the calls.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.config import WEIGHT_FORMATS
from slmkit.cpu_ops import InferenceLinear, Int8Linear, PackedLinear, can_prepack, can_quantize_int8
from slmkit.errors import UserError
from slmkit.model import GPT, KVCache


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


_prepared: weakref.WeakKeyDictionary[GPT, tuple[tuple, GPT]] = weakref.WeakKeyDictionary()


def _weights_key(model: GPT, device: torch.device, dtype: torch.dtype) -> tuple:
    # A parameter's _version counts its in-place updates (optimizer steps, load_state_dict).
    return (str(device), dtype, tuple((p.data_ptr(), p._version) for p in model.parameters()))


def decoding_model(model: GPT, device: torch.device, dtype: torch.dtype, weights: str = "auto") -> GPT:
    """An eval-mode copy of `model` on `device` for decoding.

    weights "auto": in `dtype`, prepacked on CPU where oneDNN can; with float32 on a device where
    nothing can be packed, the model itself is returned. "int8": weight-only int8 linears, bf16
    elsewhere (CPU only).
    """
    device = torch.device(device)
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"unknown weight format {weights!r}; use {' or '.join(WEIGHT_FORMATS)}")
    if weights == "int8":
        if not can_quantize_int8(device):
            raise UserError("int8 weights need the CPU and a PyTorch with _weight_int8pack_mm (2.3 or newer)")
        dtype = torch.bfloat16
    pack = weights == "auto" and device.type == "cpu" and can_prepack(dtype)
    if dtype == torch.float32 and not pack:
        return model
    key = (weights, *_weights_key(model, device, dtype))
    hit = _prepared.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    fast = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
    if weights == "int8":
        _replace_linears(fast, Int8Linear)
    elif pack:
        _replace_linears(fast, PackedLinear)
    _prepared[model] = (key, fast)
    return fast


class DecodeStep:
    """One new token of one sequence through a model from `decoding_model`: GPT.forward(token,
    cache) for the case that decoding repeats hundreds of times, written for speed.

    The arithmetic is the model's (the tests hold the two together); what differs is the number of
    calls: parameters are looked up once here rather than per module call, GELU and the residual
    additions are fused into the linears (`InferenceLinear`), and keys and values go straight from
    the qkv product into the cache. It needs the cache to hold the sequence's earlier tokens (at
    least one: the prompt is prefilled by GPT.forward).
    """

    def __init__(self, model: GPT):
        cfg, t = model.config, model.transformer
        self.post_ln = cfg.ln == "post"
        self.gelu = "tanh" if cfg.gelu == "tanh" else "none"
        self.width = (cfg.n_embd,)
        self.eps = cfg.layer_norm_epsilon
        self.heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn, b.attn.c_proj,
                        b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias) if "ln_f" in t else None
        self.head = model.lm_head

    @staticmethod
    def fits(model: nn.Module) -> bool:
        """A GPT whose linears were all replaced by `decoding_model` (packed or int8)."""
        return isinstance(model, GPT) and all(
            isinstance(m, InferenceLinear) for m in model.modules() if isinstance(m, nn.Linear | InferenceLinear))

    def can_take(self, cache: KVCache) -> bool:
        return 0 < cache.length < cache.max_len and cache.kv[0] is not None and cache.kv[0].shape[0] == 1

    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        """The next-token logits after `token`, [1, vocab]; the cache grows by that token."""
        pos, width, eps = cache.length, self.width, self.eps
        x = (self.wte[token] + self.wpe[pos]).view(1, -1)
        for (w1, b1, qkv_proj, out_proj, w2, b2, fc, fc_proj), kv in zip(self.layers, cache.kv, strict=True):
            h = x if self.post_ln else F.layer_norm(x, width, w1, b1, eps)
            qkv = qkv_proj.forward_rows(h).view(3, self.heads, self.head_dim)
            kv[0, pos] = qkv[1:]  # this token's keys and values, in the cache's dtype
            seen = kv[:, : pos + 1]
            q = qkv[0].view(1, self.heads, 1, self.head_dim).to(kv.dtype)
            y = F.scaled_dot_product_attention(q, seen[:, :, 0].transpose(1, 2), seen[:, :, 1].transpose(1, 2))
            x = out_proj.forward_add(y.view(1, -1).to(x.dtype), x)
            if self.post_ln:  # GPT-1: normalise after each residual addition
                x = F.layer_norm(x, width, w1, b1, eps)
            h = x if self.post_ln else F.layer_norm(x, width, w2, b2, eps)
            x = fc_proj.forward_add(fc.forward_gelu(h, self.gelu), x)
            if self.post_ln:
                x = F.layer_norm(x, width, w2, b2, eps)
        cache.advance(1)
        if self.ln_f is not None:
            x = F.layer_norm(x, width, *self.ln_f, eps)
        return self.head.forward_rows(x)
