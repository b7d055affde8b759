"""The fine-tuning model: the pre-trained GPT, its vocabulary grown by s / $ / e, and one linear head.

No architecture change per task: the head reads the last layer's hidden state at the extract token.
Similarity adds the two orders' states before the head; multiple choice scores every answer to one
logit and takes a softmax over the answers (padding answers masked out). All sequences of a batch
(both orders, every answer) go through the transformer in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.cpu_ops import Dropout
from slmkit.errors import UserError
from slmkit.finetune.tasks import TaskSpec
from slmkit.finetune.transforms import ROLES, Batch
from slmkit.model import GPT
from slmkit.tokenizers import DELIM, EXTRACT, START, Tokenizer, WithSpecialsTokenizer

ROLE_TOKENS = {"start": START, "delim": DELIM, "extract": EXTRACT}


def resize_token_embeddings(model: GPT, new_size: int, generator: torch.Generator | None = None) -> None:
    """Grow the token embedding (and the tied LM head) to `new_size` rows.

    Old rows are copied bit for bit; new rows are drawn from N(0, 0.02), GPT-1's initialisation.
    """
    old = model.transformer.wte.weight
    n_old, width = old.shape
    if new_size < n_old:
        raise UserError(f"cannot shrink the vocabulary from {n_old} to {new_size}")
    if new_size == n_old:
        return
    emb = nn.Embedding(new_size, width, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        emb.weight[:n_old] = old
        new_rows = torch.empty(new_size - n_old, width, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        emb.weight[n_old:] = new_rows.to(device=old.device, dtype=old.dtype)
    tied = model.lm_head.weight is old
    model.transformer.wte = emb
    if tied:
        model.lm_head.weight = emb.weight
    else:  # an untied head grows the same way
        head = nn.Linear(width, new_size, bias=False, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            head.weight[:n_old] = model.lm_head.weight
            head.weight[n_old:] = torch.empty(new_size - n_old, width).normal_(0.0, 0.02, generator=generator)
        model.lm_head = head
    model.config.vocab_size = new_size


def transfer_layers(model: GPT, n: int, seed: int) -> None:
    """Keep the embeddings and blocks 0..n-1 of a pre-trained `model`; blocks n.. become exactly what
    fresh training with `seed` puts there: a new GPT of the same config, built after
    torch.manual_seed(seed) as `slm train` (and --random-init) builds it, lends its blocks.

    Call it before the vocabulary grows: a fresh GPT's blocks depend on the random numbers its
    embeddings drew first. The final layer norm of a pre-LN model is kept: like the embeddings it is
    part of the input / output interface (the tied LM head reads through it), not a transformer
    block. The global random state is left as it was, so the head that follows is initialised as
    with every layer transferred.
    """
    n_layer = model.config.n_layer
    if not 0 <= n <= n_layer:
        raise UserError(f"--transfer-layers must be in 0..{n_layer} (the pre-trained model has n_layer "
                        f"{n_layer}), got {n}")
    if n == n_layer:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            fresh = GPT(model.config)
    with torch.no_grad():
        for i in range(n, n_layer):
            model.transformer.h[i].load_state_dict(fresh.transformer.h[i].state_dict())


def add_special_tokens(model: GPT, tokenizer: Tokenizer, seed: int = 0) -> Tokenizer:
    """Make sure the vocabulary has start / delim / extract; grow the model when it does not.

    Returns the tokenizer to use: the same one when the roles already exist (slmkit's BPE, an
    imported GPT-1), otherwise a "with-specials" wrapper whose new ids follow the model's rows.
    """
    missing = [r for r in ROLES if r not in tokenizer.special]
    if not missing:
        return tokenizer
    offset = max(model.config.vocab_size, tokenizer.vocab_size)
    if isinstance(tokenizer, WithSpecialsTokenizer):  # add to the existing wrapper instead of nesting
        base, tokens = tokenizer.base, tokenizer.tokens + [ROLE_TOKENS[r] for r in missing]
        if tokenizer.vocab_size != offset:
            raise UserError("the model's vocabulary does not match its with-specials tokenizer")
        new_tok = WithSpecialsTokenizer(base, tokenizer.offset, tokens)
    else:
        new_tok = WithSpecialsTokenizer(tokenizer, offset, [ROLE_TOKENS[r] for r in missing])
    g = torch.Generator().manual_seed(seed)
    resize_token_embeddings(model, new_tok.vocab_size, generator=g)
    return new_tok


@dataclass
class Output:
    logits: torch.Tensor  # [B, n_labels], [B] (regression) or [B, K] (multiple choice)
    lm_loss: torch.Tensor | None


POOLS = ("extract", "mean")


class FineTuneModel(nn.Module):
    """`pool` is what the head reads of the last layer: GPT-1's state at the extract token, or the mean
    of the states of every token of the sequence (padding excluded)."""

    def __init__(self, gpt: GPT, spec: TaskSpec, clf_dropout: float = 0.1, pool: str = "extract"):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.gpt = gpt
        self.spec = spec
        self.pool = pool
        self.dropout = Dropout(clf_dropout)
        self.head = nn.Linear(gpt.config.n_embd, spec.num_outputs)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch, with_lm: bool = False) -> Output:
        ids, lengths = batch.ids, batch.lengths
        B, K, T = ids.shape
        flat, flat_len = ids.view(B * K, T), lengths.view(B * K)
        valid = flat_len > 0
        all_valid = bool(valid.all())
        x, xl = (flat, flat_len) if all_valid else (flat[valid], flat_len[valid])
        h = self.gpt.hidden_states(x)  # [N, T, C]: one call for every order / answer
        rows = torch.arange(x.size(0), device=x.device)
        if self.pool == "mean":
            real = (torch.arange(T, device=x.device)[None, :] < xl[:, None]).to(h.dtype)
            at_e = (h * real[:, :, None]).sum(dim=1) / xl[:, None].to(h.dtype)
        else:
            at_e = h[rows, xl - 1]  # the extract token is the last real token of each sequence
        lm_loss = None
        if with_lm:
            # L1 on the transformed sequence: position t predicts token t+1, pads excluded.
            pos = torch.arange(T - 1, device=x.device)
            mask = pos[None, :] < (xl[:, None] - 1)
            logits = self.gpt.lm_head(h[:, :-1][mask])
            lm_loss = F.cross_entropy(logits.float(), x[:, 1:][mask])
        if not all_valid:
            full = at_e.new_zeros(B * K, at_e.size(-1))
            full[valid] = at_e
            at_e = full
        state = at_e.view(B, K, -1)
        if self.spec.family == "similarity":
            out = self.head(self.dropout(state.sum(dim=1)))  # both orders added element-wise
        elif self.spec.family == "multiple_choice":
            out = self.head(self.dropout(state)).squeeze(-1)  # [B, K]: one logit per answer
            out = out.float().masked_fill(lengths == 0, float("-inf"))
        else:
            out = self.head(self.dropout(state[:, 0]))
        if self.spec.is_regression:
            out = out.squeeze(-1)
        return Output(out.float(), lm_loss)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L2: cross-entropy over labels / answers, or MSE on the target scaled to [0, 1]."""
        if self.spec.is_regression:
            lo, hi = self.spec.regression
            return F.mse_loss(logits, (labels.float() - lo) / (hi - lo))
        return F.cross_entropy(logits, labels)

    def loss(self, batch: Batch, lm_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(L3 = L2 + lm_coef * L1, L2, L1). With lm_coef 0 the LM head is never run: L3 is L2 exactly."""
        out = self.forward(batch, with_lm=lm_coef > 0)
        task = self.task_loss(out.logits, batch.labels)
        if out.lm_loss is None:
            return task, task, None
        return task + lm_coef * out.lm_loss, task, out.lm_loss

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
