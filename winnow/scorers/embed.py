"""Sentence embeddings for diversity selection: mean-pooled final hidden states.

For a transformers encoder (e.g. the sentence encoder all-MiniLM-L6-v2, which was trained with mean
pooling) the embedding of an example is the mean of its last hidden states over real (non-padding)
tokens, L2-normalised; the DPP kernels of `winnow.selectors.dpp` compare these unit vectors.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mean_pooled_embeddings(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """(B, d) float32 embeddings: mean of the last hidden state over positions where the mask is 1.

    A row with no real token gets a zero vector (and stays zero after normalisation)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    emb = (hidden * m).sum(1).float() / m.sum(1).float().clamp(min=1.0)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb
