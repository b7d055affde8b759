"""A model prepared for decoding: weights cast once to the inference dtype and, on CPU, prepacked
for oneDNN, or quantized to int8.

Generating one token reads every weight once, so batch-1 decoding is bound by how fast the
matrix-vector products stream their weights. Two things make them faster on CPU:

- casting the weights once, instead of autocast re-casting all of them at every token;
- prepacking each weight in oneDNN's blocked layout (what `torch.compile` does for frozen CPU
  models): 21-25 us per shakespeare-char projection in bf16, against 62 us for `F.linear`.

`weights="int8"` goes further: weight-only int8 with one scale per output channel and bf16
activations (the scheme of gpt-fast and llama.cpp's Q8_0, per channel instead of per block),
through PyTorch's `_weight_int8pack_mm` CPU kernel: 15-18 us per projection, half the bytes to
stream. It is opt-in because it changes the numbers a little (README: measured loss change).

The prepared copy is cached per model and rebuilt when the model's weights change (training,
loading), so it is safe to generate between training steps.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from slmkit.config import WEIGHT_FORMATS
from slmkit.errors import UserError
from slmkit.model import GPT


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN linear with prepacked weights exists in this build for this dtype."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """nn.Linear for inference, its weight reordered once into oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        # The batch-size hint only tunes the layout; other batch sizes still give the same results.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class Int8Linear(nn.Module):
    """Weight-only int8 linear: w ~ q * scale per output channel, bf16 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        # The kernel takes bf16 scales: quantize against the rounded scale so that q * scale is
        # what the kernel multiplies back.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        self.out_features = w.shape[0]
        self.weight_int8 = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scales
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def can_quantize_int8(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


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
