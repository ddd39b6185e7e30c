"""FA3's `flash_attn_interface` for the record scripts on a machine without FlashAttention 3 (tools/compare_script.sh):
the varlen call runs torch's varlen_attn (FA2 kernels, a custom op, so fullgraph compile sees one opaque call), the
dense call SDPA. Only what the PR #1756 script calls: causal attention, 8 query / 4 KV heads, tensors returned."""
import inspect

import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

_PARAMS = inspect.signature(varlen_attn).parameters
_CAUSAL = {"is_causal": True} if "is_causal" in _PARAMS else {"window_size": (-1, 0)}  # torch 2.11+: window_size


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), **_):
    assert causal and tuple(window_size) == (-1, -1), "only causal attention without a window"
    kw = dict(_CAUSAL, scale=softmax_scale)
    if "enable_gqa" in _PARAMS:
        kw["enable_gqa"] = True
    else:
        groups = q.size(-2) // k.size(-2)
        k, v = k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k,
                       int(max_seqlen_q), int(max_seqlen_k), **kw)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **_):
    assert causal, "only causal attention"
    groups = q.size(-2) // k.size(-2)
    q, k, v = q.transpose(1, 2), k.repeat_interleave(groups, 2).transpose(1, 2), v.repeat_interleave(groups, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale).transpose(1, 2)
