"""Cross-check the orthogonal adapter against Hugging Face PEFT's OFT.

PEFT rotates the *input*: ``y = base(x @ R_peft)`` with
``R_peft = (I - S)(I + S)^-1`` (``S`` skew-symmetric from the upper triangle it stores),
so its merged weight is ``W R_peft^T``.  We rotate the *weight*: ``W' = W R`` with
``R = (I - Q)^-1 (I + Q)``.  For ``Q = S`` (our full generator set to PEFT's upper
triangle, so ``Q = U - U^T = S``), ``R = R_peft^T`` — the sign convention — and the
merged weights and the layer outputs are equal.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from orthserve.adapters import BlockRotation
from torch.nn.utils import parametrize

peft = pytest.importorskip("peft")


def test_orthogonal_adapter_equals_peft_oft_exact_cayley():
    torch.manual_seed(0)
    in_features, out_features, block_size = 32, 24, 8
    blocks = in_features // block_size
    base = nn.Linear(in_features, out_features)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(in_features, out_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    net = Net()
    net.proj.load_state_dict(base.state_dict())
    config = peft.OFTConfig(target_modules=["proj"], oft_block_size=block_size, r=0,
                            use_cayley_neumann=False, init_weights=False)
    peft_model = peft.get_peft_model(net, config)
    oft_layer = peft_model.base_model.model.proj
    upper = oft_layer.oft_R["default"].weight.detach()  # [blocks, b(b-1)/2], random since init_weights=False
    assert upper.abs().sum() > 0

    ours = nn.Linear(in_features, out_features)
    ours.load_state_dict(base.state_dict())
    rotation = BlockRotation(in_features, blocks)
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    with torch.no_grad():
        rotation.generator.zero_()
        rotation.generator[:, rows, cols] = upper  # Q = U - U^T = PEFT's S
    parametrize.register_parametrization(ours, "weight", rotation)

    x = torch.randn(5, in_features)
    with torch.no_grad():
        assert torch.allclose(ours(x), peft_model(x), atol=1e-5)
        peft_blocks = oft_layer.oft_R["default"]._cayley_batch(upper, block_size, use_cayley_neumann=False)
        assert torch.allclose(rotation.rotation_blocks(), peft_blocks.transpose(-1, -2), atol=1e-6)  # R = R_peft^T
        merged_ours = ours.weight.clone()
        peft_model.merge_adapter()
        assert torch.allclose(merged_ours, oft_layer.get_base_layer().weight, atol=1e-5)
