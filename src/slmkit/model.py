"""The GPT of Radford et al. (2018), readable side by side with the paper.

h0 = U We + Wp                       token + learned position embeddings
hl = transformer_block(h(l-1))       masked multi-head self-attention + position-wise MLP (GELU)
P(u) = softmax(hn We^T)              the output head is tied to the token embedding

GPT-1 normalises after each residual addition (post-LN); GPT-2 moved the layer norms in front of
each sub-block and added a final one (pre-LN). Both are one flag here. Parameter names follow the
Hugging Face GPT-2 layout (transformer.wte, transformer.h.N.attn.c_attn, ...) so that weights map
one to one; our linear layers store [out, in] while HF's Conv1D stores [in, out].

Read top to bottom: attention, MLP, block, the GPT itself, then the KV cache that decoding uses.
`slmkit.reference` is the same network written plainly (attention spelled out, no cache) and
`slmkit.cpu_ops` holds the CPU kernels, of which the model uses one: `Dropout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.config import ModelConfig
from slmkit.cpu_ops import Dropout, causal_attention, use_cpu_attention  # faster CPU forms of torch's


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.attention_dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if cache is None:
            q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            dropout = self.attn_dropout if self.training else 0.0
            if use_cpu_attention(q, dropout):
                y = causal_attention(q, k, v)
            else:  # SDPA picks flash / memory-efficient kernels on GPU and a fused kernel on CPU.
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = cache.attend(self.layer, qkv.view(B, T, 3, self.n_head, C // self.n_head))
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=cfg.bias)
        # GPT-1/GPT-2 use the tanh approximation; exact (erf) GELU, nanoGPT's, is cheaper in bf16 on CPU.
        self.gelu = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_ln = cfg.ln == "post"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.post_ln:  # GPT-1: n = LN(x + attn(x)); h = LN(n + mlp(n))
            x = self.ln_1(x + self.attn(x, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), cache)  # GPT-2: residual stream with norms in front
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a GPT")
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            )
        )
        if cfg.ln == "pre":
            self.transformer["ln_f"] = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-1
        self.apply(self._init_weights)
        if cfg.scaled_residual_init:
            # GPT-2's scaled init of the projections into the residual stream keeps its variance flat
            # with depth; GPT-1 initialised every weight from N(0, 0.02) (scaled_residual_init off).
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # the paper's N(0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last layer's hidden state at every position: [batch, time, n_embd]."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        else:
            pos = cache.positions(B, T, idx.device)  # [T], or [B, T] when sequences differ in length
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and with `targets` the mean next-token cross-entropy (targets of -1 are ignored)."""
        h = self.hidden_states(idx, cache)
        if last_only:
            h = h[:, -1:, :]  # generation needs only the next token's distribution
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size, dtype)

    def param_breakdown(self) -> ParamBreakdown:
        def count(pred) -> int:
            return sum(p.numel() for n, p in self.named_parameters() if pred(n))

        return ParamBreakdown(
            token_embedding=self.transformer.wte.weight.numel(),
            position_embedding=self.transformer.wpe.weight.numel(),
            attention=count(lambda n: ".attn." in n),
            mlp=count(lambda n: ".mlp." in n),
            layer_norm=count(lambda n: ".ln_" in n),
            head=0 if self.lm_head.weight is self.transformer.wte.weight else self.lm_head.weight.numel(),
            total=sum(p.numel() for p in self.parameters()),  # parameters() counts tied weights once
        )

    def num_params(self) -> int:
        return self.param_breakdown().total

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only (slmkit.optim.optimizer_groups); kept for callers of the model."""
        from slmkit.optim import optimizer_groups

        return optimizer_groups(self, weight_decay)


@dataclass
class ParamBreakdown:
    token_embedding: int
    position_embedding: int
    attention: int
    mlp: int
    layer_norm: int
    head: int  # 0: tied to the token embedding
    total: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def attend(qkv: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The new queries of qkv [B, T, 3, H, D] over cached keys and values [B, time, 2, H, D], in the
    cache's dtype; mask None: the queries see every key, or are the first tokens (causal)."""
    q = qkv[:, :, 0].transpose(1, 2).to(keys.dtype)
    k, v = keys[:, :, 0].transpose(1, 2), keys[:, :, 1].transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1)
    return y.to(qkv.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one step.

    One buffer per layer holds keys and values side by side, [batch, time, 2, heads, head_dim], so
    each step stores both with a single copy straight from the qkv projection. Buffers are
    allocated for the whole context at the first write and filled left to right, in `dtype` if
    given (else the model's compute dtype).
    """

    def __init__(self, n_layer: int, max_len: int, dtype: torch.dtype | None = None):
        self.n_layer = n_layer
        self.max_len = max_len
        self.dtype = dtype
        self.length = 0
        self.kv: list[torch.Tensor | None] = [None] * n_layer
        self._mask: torch.Tensor | None = None

    def positions(self, batch: int, T: int, device: torch.device) -> torch.Tensor:
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.max_len}")
        # New queries sit at positions length..end-1 and may see every key up to their own: one
        # boolean mask for all layers. A single query sees everything, and the first tokens are
        # plainly causal, so neither needs one.
        past = self.length
        self._mask = (torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=past)
                      if past > 0 and T > 1 else None)
        return torch.arange(past, end, device=device)

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values of qkv [B, T, 3, H, D] after the cached tokens; return the new
        queries' attention over all of them, [B, H, T, D]."""
        B, T, _, H, D = qkv.shape
        if self.kv[layer] is None:
            self.kv[layer] = qkv.new_zeros(B, self.max_len, 2, H, D, dtype=self.dtype or qkv.dtype)
        end = self.length + T
        buf = self.kv[layer]
        buf[:, self.length : end] = qkv[:, :, 1:]
        return attend(qkv, buf[:, :end], self._mask)

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0


class SlotKVCache:
    """The KV cache of continuous batching: one row ("slot") per sequence, each with its own length,
    so sequences that started at different times decode together in one forward pass.

    Two kinds of forward use it. After `prefill(row)`, one sequence's new tokens ([1, T]) go into
    that row, exactly as KVCache stores them. Otherwise rows 0..B-1 each take one token ([B, 1]) at
    their own position; the caller keeps the running sequences in the first rows (`move` fills a
    finished row's gap).

    A row attends over its own keys only (a [B, 1, 1, time] mask hides the longer rows' tail).
    Batched rows round a little differently from a sequence decoded alone (the matrix kernels
    differ with the batch; in bf16 up to ~0.01 in a logit), so the server's tests check that greedy
    answers agree, and its benchmark counts how often they do.
    """

    def __init__(self, n_layer: int, max_len: int, slots: int, dtype: torch.dtype | None = None):
        self.max_len = max_len
        self.slots = slots
        self.dtype = dtype
        self.lengths = [0] * slots
        self.kv: list[torch.Tensor | None] = [None] * n_layer
        self._row: int | None = None  # the row of the next prefill
        self._rows = 0  # rows of the current batched step
        self._mask: torch.Tensor | None = None  # which keys each new query sees (None: causal)

    def prefill(self, row: int) -> None:
        """The next forward feeds `row` alone: a prompt, or the window kept after a slide."""
        self._row = row

    def positions(self, batch: int, T: int, device: torch.device) -> torch.Tensor:
        if self._row is not None:
            start, end = self.lengths[self._row], self.lengths[self._row] + T
            if batch != 1 or end > self.max_len:
                raise ValueError(f"a prefill feeds one sequence of at most {self.max_len} tokens")
            self._mask = torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=start) if start else None
            return torch.arange(start, end, device=device)
        if T != 1 or batch > self.slots or any(n >= self.max_len for n in self.lengths[:batch]):
            raise ValueError("a batched step feeds one token to each of the first rows, inside the context")
        self._rows = batch
        lengths = torch.tensor(self.lengths[:batch], device=device)
        self._mask = (torch.arange(max(self.lengths[:batch]) + 1, device=device) <= lengths[:, None])[:, None, None]
        return lengths[:, None]

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        B, T, _, H, D = qkv.shape
        if self.kv[layer] is None:
            self.kv[layer] = qkv.new_zeros(self.slots, self.max_len, 2, H, D, dtype=self.dtype or qkv.dtype)
        buf = self.kv[layer]
        if self._row is not None:
            row, start = self._row, self.lengths[self._row]
            buf[row, start : start + T] = qkv[0, :, 1:]
            return attend(qkv, buf[row : row + 1, : start + T], self._mask)
        rows = torch.arange(B, device=qkv.device)
        buf[rows, self._mask.new_tensor(self.lengths[:B], dtype=torch.long)] = qkv[:, 0, 1:].to(buf.dtype)
        return attend(qkv, buf[:B, : self._mask.shape[-1]], self._mask)

    def advance(self, T: int) -> None:
        if self._row is not None:
            self.lengths[self._row] += T
            self._row = None
        else:
            for row in range(self._rows):
                self.lengths[row] += 1

    def clear(self, row: int) -> None:
        """Forget `row`'s tokens (a new sequence, or a slid window, is prefilled next)."""
        self.lengths[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Put row `src`'s sequence in row `dst` (keeping the running rows first)."""
        n = self.lengths[src]
        for buf in self.kv:
            if buf is not None:
                buf[dst, :n] = buf[src, :n]
        self.lengths[dst], self.lengths[src] = n, 0
