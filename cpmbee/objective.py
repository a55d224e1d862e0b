"""The training objective: cross-entropy on the answer tokens, projecting only where there are labels.

``CpmBeeForCausalLM(**batch).loss`` computes logits over the whole vocabulary (86,583 columns) at every
position, although fine-tuning labels only the answer tokens (2 of ~60 tokens in CCPM). ``AnswerObjective``
runs the transformer, gathers the hidden states at labelled positions and projects only those: the same
loss (tested) for a fraction of the projection's time and memory. Fine-tuning, pre-training and the likelihood
scorer of evaluation (``cpmbee.evaluation.likelihood``) use it.

It is an ``nn.Module`` wrapping the (plain or PEFT) model, so ``accelerator.prepare`` can wrap *it* in
DDP/FSDP and every forward goes through the wrapper. It returns *sums* (loss, tokens), so the trainer can
normalize by the token count of the whole optimizer step across processes and accumulation.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .generation import allowed_output_columns
from .inputs import BATCH_NAMES
from .model import CpmBeeForCausalLMBase

__all__ = ["AnswerObjective"]

BATCH_KEYS = BATCH_NAMES  # what make_training_batch / the collators may produce


class AnswerObjective(nn.Module):
    """``forward(**batch)`` → ``{"loss_sum", "tokens"}`` (and per-row statistics with ``row_stats=True``).

    Args:
        model: a ``CpmBeeForCausalLM`` or a ``peft.PeftModel`` around one.
        unk_id: the tokenizer's ``<unk>`` id (for ``row_exact``).
    """

    def __init__(self, model: nn.Module, unk_id: int = 1) -> None:
        super().__init__()
        self.model = model
        self.unk_id = unk_id

    @property
    def lm(self) -> CpmBeeForCausalLMBase:
        """The ``CpmBeeForCausalLM`` inside (adapters, if any, stay injected in its layers)."""
        get_base_model = getattr(self.model, "get_base_model", None)
        return cast(CpmBeeForCausalLMBase, get_base_model() if get_base_model is not None else self.model)

    def forward(
        self,
        row_stats: bool = False,
        token_stats: bool = False,
        token_greedy: bool = False,
        **batch: torch.Tensor,
    ) -> dict[str, Any]:
        """Sums over the batch's labelled positions.

        Returns ``loss_sum`` (scalar, differentiable), ``tokens`` (labelled positions); with ``token_stats``:
        ``token_loss`` ``(N,)`` the detached cross-entropy of each labelled position and ``label_mask``
        ``(B, L)`` where they are (row-major order); with ``row_stats``: ``row_loss`` ``(B,)`` summed
        cross-entropy per row, ``row_tokens`` ``(B,)``, ``row_exact`` ``(B,)`` bool — every answer token is the
        greedy choice among the allowed columns (``cpmbee.generation.allowed_output_columns``), i.e. greedy
        decoding would reproduce the answer; with ``token_greedy``: ``token_greedy`` ``(N,)`` bool, whether
        each labelled position's label is its highest-scoring allowed column.
        """
        unknown = set(batch) - set(BATCH_KEYS)
        if unknown:
            raise ValueError(f"unexpected batch keys {sorted(unknown)}")
        lm = self.lm
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        hidden = lm.cpmbee(batch["input_ids"], **inputs).last_hidden_state  # (B, L, D)
        mask = labels != -100  # (B, L)
        picked = hidden[mask]  # (N, D)
        logits = lm.cpmbee.input_embedding(
            batch["ext_table_ids"], batch["ext_table_sub"], hidden_states=picked[None]
        )[0].float()  # (N, V + E)
        target = labels[mask].long().to(logits.device)
        ce = F.cross_entropy(logits, target, reduction="none")  # (N,)
        out: dict[str, Any] = {"loss_sum": ce.sum(), "tokens": int(target.numel())}
        if token_stats:
            out["token_loss"] = ce.detach()
            out["label_mask"] = mask
        if row_stats or token_greedy:
            rows = mask.nonzero()[:, 0].to(logits.device)  # row of each labelled position
            allowed = allowed_output_columns(
                {k: v.to(logits.device) for k, v in batch.items()}, lm.config.vocab_size, self.unk_id
            )
            scores = logits.detach().masked_fill(~allowed[rows], float("-inf"))
            right = scores.argmax(dim=-1) == target  # (N,)
            if token_greedy:
                out["token_greedy"] = right
        if row_stats:
            b = labels.shape[0]
            zeros = torch.zeros(b, dtype=torch.float32, device=logits.device)
            out["row_loss"] = zeros.index_add(0, rows, ce.detach())
            out["row_tokens"] = zeros.index_add(0, rows, torch.ones_like(ce))
            wrong = (~right).float()
            out["row_exact"] = (zeros.index_add(0, rows, wrong) == 0) & (out["row_tokens"] > 0)
        return out
