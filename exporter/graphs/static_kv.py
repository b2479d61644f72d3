"""The decoder's static KV layout (`--kv-cache static`, ONNX Runtime only): preallocated cache
buffers written in place, instead of the concat layout's Concat(past, new), a copy of the whole
cache per step (decoder.py).

past_key_values.{i}.* and present.{i}.* are [B,kv,M,hd] alike, of which the first P+S columns
are live: com.microsoft.GroupQueryAttention writes the S new positions at columns P..P+S-1 and
attends over columns 0..P+S-1 only. Bound to one OrtValue as both past and present
(runtime/backends/ort.py), the buffer is updated in place.
"""

from __future__ import annotations

import torch
from torch import nn

STATIC_ATTENTION = "llava_export_static_kv"  # the transformers attention implementation below


def group_query_attention(
    query, key, value, past_key, past_value, attention_bias, num_heads: int, kv_num_heads: int, scale: float
):
    """ONNX Runtime's com.microsoft.GroupQueryAttention on a preallocated cache: the ONNX node
    while exporting, the same arithmetic in PyTorch otherwise.

    query [B,S,heads*hd], key/value [B,S,kv*hd] (rotary applied), past_key/value [B,kv,M,hd]
    live in columns 0..T-S-1, attention_bias [B,1,S,T] additive (causal and padding)
    -> output [B,S,heads*hd], present_key/value [B,kv,M,hd]: past with the S new positions
    written at columns T-S..T-1. Columns from T on are neither read nor written.

    The node gets total_sequence_length T and seqlens_k [B] = T-1 for every row: left padding
    ends every row at the same column, and the bias hides the padding. Its own causal mask
    agrees with the bias'."""
    if not torch.onnx.is_in_onnx_export():
        return group_query_attention_reference(
            query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads, scale
        )
    batch, total = query.shape[0], attention_bias.shape[-1]
    seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
    total_sequence_length = torch.full((), total, dtype=torch.int32)
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_sequence_length,
            None,
            None,
            None,
            attention_bias,
        ],
        {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": scale},
        dtypes=[query.dtype, past_key.dtype, past_value.dtype],
        shapes=[query.shape, past_key.shape, past_value.shape],
        version=1,
    )


def group_query_attention_reference(
    query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads, scale
):
    """group_query_attention in PyTorch ops (same arguments and results)."""
    batch, new, _ = query.shape
    total, head_dim = attention_bias.shape[-1], past_key.shape[-1]
    presents = []
    for past, states in ((past_key, key), (past_value, value)):
        present = past.clone()
        present[:, :, total - new : total] = states.view(batch, new, kv_num_heads, head_dim).transpose(1, 2)
        presents.append(present)
    groups = num_heads // kv_num_heads
    keys, values = (p[:, :, :total].repeat_interleave(groups, dim=1) for p in presents)  # [B,heads,T,hd]
    queries = query.view(batch, new, num_heads, head_dim).transpose(1, 2)
    scores = (queries @ keys.transpose(2, 3)).float() * scale + attention_bias.float()
    output = scores.softmax(-1).to(values.dtype) @ values  # [B,heads,S,hd]
    return output.transpose(1, 2).reshape(batch, new, num_heads * head_dim), presents[0], presents[1]


def static_kv_attention(
    module, query, key, value, attention_mask, scaling, static_kv=None, sliding_window=None, **kwargs
):
    """A transformers attention implementation over the static cache `static_kv` (a list of
    [key, value] buffers per layer, replaced by the presents). query [B,heads,S,hd], key/value
    [B,kv,S,hd] (the new positions only: no transformers cache is involved), attention_mask the
    additive bias [B,1,S,T] -> ([B,S,heads,hd], no weights)."""
    assert sliding_window is None, "check_kv_cache refuses sliding-window models"
    batch, heads, new, head_dim = query.shape
    kv_heads = key.shape[1]
    layer = static_kv[module.layer_idx]
    flat = [
        states.transpose(1, 2).reshape(batch, new, -1) for states in (query, key, value)
    ]  # [B,S,heads*hd]
    output, layer[0], layer[1] = group_query_attention(
        *flat, layer[0], layer[1], attention_mask, heads, kv_heads, scaling
    )
    return output.view(batch, new, heads, head_dim), None


def attention_bias(attention_mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask [B,T] (0 on left padding) -> additive bias [B,1,S,T]: 0 where the query at
    column T-S+i may see column j (j <= T-S+i, not padding), the dtype's min elsewhere (as
    transformers' eager mask; a padding query row, fully masked, stays finite)."""
    total = attention_mask.shape[1]
    columns = torch.arange(total)
    rows = torch.arange(new) + (total - new)
    visible = (columns[None, :] <= rows[:, None])[None] & attention_mask[:, None, :].bool()  # [B,S,T]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


class DecoderWithStaticCache(nn.Module):
    """decoder.DecoderWithPast over preallocated buffers: past_key_values [B,kv,M,hd] each, live
    in columns 0..P-1 (P = attention_mask width - S); returns (logits, the buffers with the S new
    positions written at P..P+S-1)."""

    def __init__(self, llava: nn.Module):
        from transformers import AttentionInterface

        super().__init__()
        self.language_model = llava.model.language_model  # DecoderWithPast's names: the same initializers
        self.lm_head = llava.lm_head
        AttentionInterface.register(STATIC_ATTENTION, static_kv_attention)  # forward selects it by name

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        static_kv = [[key, value] for key, value in past_key_values]
        config = self.language_model.config
        eager, config._attn_implementation = config._attn_implementation, STATIC_ATTENTION
        try:
            hidden = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_bias(
                    attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype
                ),  # 4D: used as is
                position_ids=position_ids,
                use_cache=False,
                static_kv=static_kv,
            ).last_hidden_state
        finally:
            config._attn_implementation = eager
        logits = self.lm_head(hidden[:, -1]).float()  # [B, vocab]
        return (logits, *(buffer for layer in static_kv for buffer in layer))


def in_buffers(past: list, length: int) -> list:
    """Concat-layout past [B,kv,P,hd] -> static-layout buffers [B,kv,length,hd], zeros after P."""
    return [tuple(nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in pair) for pair in past]
