"""FlashAttention-4 ``mask_mod`` functions for block_sparse's partial blocks (CuTe DSL).

Imported only after ``flash_attn.cute`` imported (it needs ``cutlass``). Each function reads
the layout from ``aux_tensors``: the group of every query and key token in kernel order
(int32 (Sq,), (Sk,)) and the allow table (int32), so one compiled kernel serves every layout of
the same table rank. The functions are module-level: flash-attn-4 caches its compiled kernels
by the function's hash, so a new closure per call would recompile.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils

__all__ = ["GROUP_MASKS"]


@cute.jit
def shared_groups(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
    """allow (Gq, Gk): the same layout for every batch and head."""
    group_q, group_k, allow = aux_tensors[0], aux_tensors[1], aux_tensors[2]
    gq = group_q[m_idx[0]]
    gk = group_k[n_idx[0]]
    return utils.scalar_to_ssa(allow[gq, gk], cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)


@cute.jit
def per_head_groups(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
    """allow (H, Gq, Gk): a layout per query head."""
    group_q, group_k, allow = aux_tensors[0], aux_tensors[1], aux_tensors[2]
    gq = group_q[m_idx[0]]
    gk = group_k[n_idx[0]]
    return utils.scalar_to_ssa(allow[head[0], gq, gk], cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)


@cute.jit
def per_batch_head_groups(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
    """allow (B, H, Gq, Gk): a layout per batch element and query head (top-k)."""
    group_q, group_k, allow = aux_tensors[0], aux_tensors[1], aux_tensors[2]
    gq = group_q[m_idx[0]]
    gk = group_k[n_idx[0]]
    return utils.scalar_to_ssa(allow[batch[0], head[0], gq, gk], cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)


#: the mask_mod for an allow table of rank 2, 3 or 4
GROUP_MASKS = {2: shared_groups, 3: per_head_groups, 4: per_batch_head_groups}
