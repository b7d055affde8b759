"""CPU kernels that PyTorch's defaults leave slow, behind a few plain names.

- `Dropout`: nn.Dropout with a cheaper mask on CPU (`cpu_dropout`);
- `causal_attention`: causal attention in bf16 as whole-matrix batched products, with its own backward
  (`use_cpu_attention` says when it is used instead of SDPA);
- `PackedLinear`: an inference linear whose weight is prepacked once in oneDNN's blocked layout, with
  GELU and the residual addition fused into the matrix product;
- `Int8Linear`: a weight-only int8 inference linear (one scale per output channel, bf16 activations).

Both are `InferenceLinear`s: y = x W^T + b, plus the two fused forms the decoding step uses.

Every private PyTorch API slmkit relies on (`torch.ops.mkldnn._linear_pointwise`,
`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._is_mkldnn_bf16_supported`,
`torch.ops.aten._weight_int8pack_mm`, `torch._softmax_backward_data` and nn.Module's hook
registries) is reached from this module only, so that a PyTorch upgrade that moves one of them
breaks one file. What each one saves is measured in the README ("Training speed on CPU", "Generation") and in `bench/`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as _module

# --- dropout -----------------------------------------------------------------------------------


class _ScaleByMask(torch.autograd.Function):
    """y = x * mask * scale; the gradient takes the same mask and scale (dropout's backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.mul(x, mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return torch.mul(grad, mask).mul_(ctx.scale), None, None


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_OF_ONE = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00, torch.float32: 0x3F800000,
                torch.float64: 0x3FF0000000000000}


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a far cheaper mask than PyTorch's CPU kernel, from the same generator.

    torch's CPU dropout draws one Bernoulli sample per element and multiplies by a bool mask. Here
    64-bit random words are cut into one integer slice per element (16 bits for bf16, 32 for fp32),
    and a few in-place integer ops turn each slice into the bit pattern of 0.0 or 1.0 in x's own
    dtype. `random_` leaves each word's sign bit at 0, so only the low width-1 bits of each slice
    are used; p is rounded to a multiple of 2^-(width-1) (2^-15 for bf16) and the scale uses the
    rounded value, so the expectation stays exact.
    """
    int_dtype = _INT_OF_SIZE[x.element_size()]
    bits = 8 * x.element_size() - 1
    levels = 1 << bits
    dropped = round(p * levels)
    if dropped >= levels:
        return F.dropout(x, p, training=True)
    n = x.numel()
    words = torch.empty((n * x.element_size() + 7) // 8, dtype=torch.int64, device=x.device).random_()
    draws = words.view(int_dtype)[:n].view(x.shape) & (levels - 1)
    # (draw - dropped) >> bits is -1 (all ones) where draw < dropped, else 0: invert, keep 1.0's bits.
    mask = draws.sub_(dropped).bitwise_right_shift_(bits).bitwise_not_().bitwise_and_(_BITS_OF_ONE[x.dtype])
    mask = mask.view(x.dtype)
    return _ScaleByMask.apply(x, mask, levels / (levels - dropped))


def _has_hooks(module: nn.Module) -> bool:
    """Any hook nn.Module.__call__ would run for `module`: its own, or one registered globally.

    The same test nn.Module._call_impl makes before its own fast path; the global registries are
    private to torch.nn.modules.module, hence reached from here.
    """
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
    )


class Dropout(nn.Module):
    """nn.Dropout, with `cpu_dropout` on CPU (CUDA's own kernel is already fast)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.dtype not in _BITS_OF_ONE or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)  # fast on CUDA; compiled code makes its own masks
        return cpu_dropout(x, self.p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module's call machinery is most of a no-op dropout's cost (19 calls per generated token
        # at shakespeare-char size), so it is skipped, but only while no hook would run through it.
        if _has_hooks(self):
            return super().__call__(x)
        return self.forward(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --- causal attention in bf16 --------------------------------------------------------------------


def use_cpu_attention(q: torch.Tensor, dropout: float) -> bool:
    """Whether `causal_attention` should replace SDPA for (B, H, T, head_dim) queries: bf16 on CPU, no
    attention dropout, not compiling, and a context of at most 4 x head_dim.

    PyTorch's fused CPU kernel computes attention in blocks with fp32 scores; at shakespeare-char's
    shape (32 x 6 heads of 256 x 64) it takes 23 ms forward and 74 ms forward + backward a layer, where
    whole-matrix bf16 batched products and PyTorch's own softmax kernels take 10 and 24-31 (README,
    "Training speed on CPU"). Whole T x T matrices stop paying above T = 4 x head_dim: there they
    hold more values than the block's MLP activation, and at 512 or 1024 positions the fused kernel
    is faster. In fp32 the batched products are slower than the fused kernel at every size.
    """
    t, head_dim = q.shape[-2:]
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout == 0.0 and 1 < t <= 4 * head_dim
            and not torch.compiler.is_compiling())


_CAUSAL_BIAS: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _causal_bias(t: int, dtype: torch.dtype) -> torch.Tensor:
    """(t, t): 0 on and below the diagonal, -inf above (a query sees itself and earlier keys)."""
    key = (t, dtype)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((t, t), float("-inf"), dtype=dtype).triu_(1)
    return _CAUSAL_BIAS[key]


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v over (batch*heads, T, head_dim) matrices, with the backward
    written out over the same batched products; the probabilities are kept for it."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
        ctx.scale = d**-0.5
        # The mask is added by the score product itself (baddbmm's input term), not by a pass of its own.
        scores = torch.baddbmm(_causal_bias(t, q.dtype).expand(b * h, t, t), q3, k3.transpose(1, 2), alpha=ctx.scale)
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q3, k3, v3, probs)
        return torch.bmm(probs, v3).view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q3, k3, v3, probs = ctx.saved_tensors
        b, h, t, d = grad_out.shape
        g3 = grad_out.reshape(b * h, t, d)
        grad_v = torch.bmm(probs.transpose(1, 2), g3)
        grad_probs = torch.bmm(g3, v3.transpose(1, 2))
        # softmax's backward, P * (dP - rowsum(dP * P)), in one pass; masked entries have P = 0.
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3).mul_(ctx.scale)
        return grad_q.view(b, h, t, d), grad_k.view(b, h, t, d), grad_v.view(b, h, t, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention of (B, H, T, head_dim) tensors, as
    F.scaled_dot_product_attention(q, k, v, is_causal=True) computes it (see `use_cpu_attention`)."""
    return _CausalAttention.apply(q, k, v)


# --- inference linears (decoding only: no autograd, weights frozen) --------------------------------


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN linear with prepacked weights exists in this build for this dtype."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class InferenceLinear(nn.Module):
    """A frozen linear layer for decoding, with the two compositions a transformer block needs.
    Subclasses that can fuse them into the matrix product override these unfused forms.

    The decoding step calls these hundreds of times per token with activations that are already
    [rows, in], contiguous and in the layer's dtype; `forward_rows` and the fused forms take
    exactly that and skip the reshaping and checks of `forward` (a few microseconds a call).
    """

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        """gelu(x W^T + b); approximate is "tanh" or "none" (exact), as in F.gelu."""
        return F.gelu(self(x), approximate=approximate)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x W^T + b + residual."""
        return self(x).add_(residual)


class PackedLinear(InferenceLinear):
    """nn.Linear for inference, its weight reordered once into oneDNN's blocked layout.

    `torch.compile` does the same for frozen CPU models; doing it by hand keeps eager decoding free
    of compilation (which on these CPUs was also slower: 1.34 ms against 0.88 ms per
    shakespeare-char token, after 15 s of compiling). oneDNN applies GELU or adds the residual
    while the product is still in registers ("post-ops"): one call instead of two, and in bf16 one
    rounding instead of two.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        # The batch-size hint only tunes the layout; other batch sizes still give the same results.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], approximate)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")


def can_quantize_int8(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(InferenceLinear):
    """Weight-only int8 linear: w ~ q * scale per output channel, bf16 activations.

    The scheme of gpt-fast and llama.cpp's Q8_0 (per channel instead of per block): half the bytes
    of bf16 to stream per decoded token.
    """

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
        return self.forward_rows(flat).view(*x.shape[:-1], self.out_features)

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return y if self.bias is None else y.add_(self.bias)

    def forward_gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return F.gelu(self.forward_rows(x), approximate=approximate)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x).add_(residual)
