"""sdpa for padding-free packed rows, one sequence at a time instead of under a dense mask.

Given a packed row (1, tokens) with no attention mask, transformers' own sdpa path builds a dense
(tokens x tokens) block-diagonal mask and attends over all of it: O(tokens^2) work and memory,
most of it masked out. `sdpa_packed` cuts the row at every position_id 0 and runs causal sdpa on
each sequence, so the work is sum(len^2), sdpa can use its causal fast kernels, and each sequence
is computed exactly as if it were alone. flash-attn varlen does the same in one kernel on GPUs;
this is the fallback for CPU and for GPUs without flash-attn.

Trade-offs: a Python loop over the sequences of a row in every layer, and one host sync per layer
to read the cut points (cheap next to the attention itself at training lengths). Only for
padding-free rows: it is registered with a mask function that builds no mask, so it must never
see padded batches (run.py selects it only for packed data).
"""

from __future__ import annotations

NAME = "sdpa_packed"


def sdpa_packed(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query (1, heads, tokens, dim), key/value (1, kv_heads, tokens, dim) -> (1, tokens, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        raise ValueError(f"{NAME} takes padding-free rows only: batch 1, position_ids, no attention mask")
    tokens = query.shape[2]
    cuts = torch.nonzero(position_ids[0] == 0).flatten().tolist() + [tokens]
    outs = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, is_causal=True, **kwargs
        )[0]
        for s, e in zip(cuts[:-1], cuts[1:])
    ]
    return torch.cat(outs, dim=1), None


def effective(resolved: str, packed: bool) -> str:
    """The attn_implementation to load: `NAME` for packed rows where sdpa was resolved, else as resolved."""
    if not (packed and resolved == "sdpa"):
        return resolved
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(NAME, sdpa_packed)
    # flash-attn's mask function: no mask for causal rows without padding, as flash varlen needs
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
