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
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from slmkit.config import WEIGHT_FORMATS
from slmkit.cpu_ops import Int8Linear, PackedLinear, can_prepack, can_quantize_int8
from slmkit.errors import UserError
from slmkit.model import GPT


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
