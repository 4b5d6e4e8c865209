"""The CUDA-graph helper's input buffers (CPU: their layout; capture and replay are tested on
the GPU machine in tests/strategies/test_dilated_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from attnpatch._cuda_graphs import _buffer_strides

QKV = torch.randn(2, 7, 3 * 4 * 8).view(2, 7, 3, 4, 8)  # a fused projection, (B, S, 3, H, D)


@pytest.mark.parametrize("tensor, strides", [
    (torch.randn(2, 4, 7, 8), (224, 56, 8, 1)),                      # bhsd memory: its own
    (torch.randn(2, 7, 4, 8).transpose(1, 2), (224, 8, 32, 1)),      # bshd memory: its own
    (QKV[:, :, 0].transpose(1, 2), (224, 8, 32, 1)),                 # q of a fused qkv: bshd
    (torch.randn(1, 1, 1, 8).expand(2, 4, 7, 8), (224, 56, 8, 1)),   # expanded: dense, D last
    (torch.randn(2, 4, 1, 8).expand(2, 4, 7, 8), (32, 8, 64, 1)),    # expanded along S
], ids=["bhsd", "bshd", "fused-qkv", "expanded", "expanded-seq"])
def test_buffers_are_dense_in_the_inputs_order_of_dims(tensor, strides):
    got = _buffer_strides(tensor)
    assert got == strides
    buffer = torch.empty_strided(tensor.shape, got)
    buffer.copy_(tensor)  # every element has its own place
    assert torch.equal(buffer, tensor) and buffer.stride(-1) == 1
    assert buffer.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
