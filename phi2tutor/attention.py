"""fp16-safe attention for Phi-2: query·key scores computed in fp32, registered with transformers.

Phi-2's query·key products reach the hundreds and overflow float16 in the eager path, which
computes them in the input dtype. This registers ``"phi2tutor_fp32_scores"`` as an attention
implementation that upcasts query and key for the scores and the softmax, then returns to the
value dtype for the weighted sum, so fp16 weights and 16-mixed autocast train without inf/NaN.
"""

from __future__ import annotations

import torch
from torch import nn

FP32_SCORES_ATTENTION = "phi2tutor_fp32_scores"


def fp32_scores_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with fp32 scores; same signature and output layout as transformers' eager path."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    # Autocast (16-mixed) would cast the matmul back to fp16: turn it off for the scores.
    with torch.autocast(device_type=query.device.type, enabled=False):
        # Pre-scaling the query keeps the fp32 products small as well as finite.
        scores = torch.matmul(query.float() * scaling, key.float().transpose(2, 3))
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        weights = torch.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    attn_output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return attn_output, weights


def register_fp32_scores_attention() -> str:
    """Register the attention function and its mask format with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(FP32_SCORES_ATTENTION, fp32_scores_attention_forward)
    # The scores take an additive float mask, as the eager path does.
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_SCORES_ATTENTION, eager_mask)
    return FP32_SCORES_ATTENTION
