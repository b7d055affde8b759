"""The GPT of `slmkit.model`, written plainly for reading: no fused kernels, no KV cache.

Attention is spelled out as in "Attention Is All You Need", which GPT-1 builds on:

    A = softmax(Q K^T / sqrt(d) + M) V       M = 0 on and below the diagonal, -inf above it

where the mask M lets each position attend only to itself and the positions before it, which is
what makes the model a left-to-right language model. Dropout is `nn.Dropout`.

The parameter names, shapes and options (post- or pre-LN, tanh or exact GELU, biases, the output
head tied to the token embedding) are those of `slmkit.model.GPT`, so a state dict loads into
either; the two give the same logits up to float rounding (tests/test_reference.py). Use this file
to read or to check; train and generate with `slmkit.model`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention, one head after the other in a single batched matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # W_Q, W_K, W_V side by side
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_O: heads back to the stream
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # A buffer, not a parameter: it moves with the model but is not saved in the state dict.
        causal = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        d = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, d]: each head attends in its own d-dimensional subspace.
        q, k, v = (t.view(B, T, self.n_head, d).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # [B, heads, T, T]: query i against key j
        scores = scores.masked_fill(~self.causal[:T, :T], float("-inf"))  # no looking ahead
        weights = self.attn_dropout(F.softmax(scores, dim=-1))
        y = weights @ v  # each position: a weighted average of the values it may see
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: widen, GELU, project back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Attention then MLP, each added back onto its input (a residual) and layer-normed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_ln = cfg.ln == "post"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # GPT-1: normalise after each addition
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))  # GPT-2: normalise each branch's input, keep the sum raw
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """h0 = U We + Wp; hl = block(h(l-1)); P(u) = softmax(hn We^T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),  # We: one vector per token
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),  # Wp: one learned vector per position
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            )
        )
        if cfg.ln == "pre":  # the pre-LN residual stream is never normalised inside: once at the end
            self.transformer["ln_f"] = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # the head reads tokens out with We itself
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-1: "a simple weight initialization of N(0, 0.02) was sufficient".
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [batch, time, vocab], and with `targets` the mean next-token cross-entropy."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
