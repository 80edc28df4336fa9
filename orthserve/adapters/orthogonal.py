"""OrthCR's orthogonal adapter: ``W' = W R`` with ``R`` block-diagonal and orthogonal.

``R`` acts on the input dimension of a ``[out, in]`` weight, so every output neuron
(row of W) is rotated the same way: row norms and the angles between rows are kept
(the "hyperspherical energy" argument of OFT).  Each ``b x b`` block is the Cayley
transform of a skew-symmetric matrix ``Q = A - A^T`` built from a full ``b x b``
generator ``A`` (zero at init, so ``R = I``):

    R = (I + Q)(I - Q)^-1                      exact, through a linear solve
    R ~ I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1) Neumann series of (I - Q)^-1, k terms

With ``max_norm`` set (the constrained "COFT" variant) ``Q`` is scaled down whenever
its Frobenius norm exceeds the bound, so R stays within a ball around the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from .base import AdapterConfig, WeightAdapter

# The FFN linears of open_clip residual blocks, and their Hugging Face BERT twins.
FFN_TARGETS = (r"mlp\.c_fc$", r"mlp\.c_proj$", r"\.intermediate\.dense$", r"layer\.\d+\.output\.dense$")


def skew(generator: torch.Tensor) -> torch.Tensor:
    return generator - generator.transpose(-1, -2)


def cayley(q: torch.Tensor, mode: str = "exact", neumann_terms: int = 5) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric ``q`` (``[..., b, b]``)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if mode == "exact":
        # (I + Q) and (I - Q)^-1 commute, so R = (I - Q)^-1 (I + Q): one solve.
        return torch.linalg.solve(eye - q, eye + q)
    if mode == "neumann":
        # (I + Q)(I + Q + ... + Q^(k-2)): k terms once expanded, as PEFT counts them.
        series, power = eye.clone(), eye
        for _ in range(neumann_terms - 2):
            power = power @ q
            series = series + power
        return (eye + q) @ series
    raise ValueError(f"unknown Cayley mode {mode!r}: use 'exact' or 'neumann'")


class BlockRotation(WeightAdapter):
    """Parametrization ``W -> W R`` with ``R = blockdiag(R_1 .. R_n)``."""

    def __init__(self, in_features: int, blocks: int, mode: str = "exact",
                 neumann_terms: int = 5, max_norm: float | None = None) -> None:
        super().__init__()
        if in_features % blocks:
            raise ValueError(f"input size {in_features} is not divisible into {blocks} blocks")
        size = in_features // blocks
        self.generator = nn.Parameter(torch.zeros(blocks, size, size))
        self.mode, self.neumann_terms, self.max_norm = mode, neumann_terms, max_norm

    def skew_generator(self) -> torch.Tensor:
        """``Q`` in fp32 (even under autocast), scaled into the COFT ball when ``max_norm`` is set."""
        q = skew(self.generator.float())
        if self.max_norm is not None:
            norms = torch.linalg.matrix_norm(q, keepdim=True)
            q = q * torch.clamp(self.max_norm / (norms + 1e-12), max=1.0)
        return q

    def rotation_blocks(self) -> torch.Tensor:
        """The ``[blocks, b, b]`` orthogonal blocks, computed in fp32 even under autocast."""
        with torch.autocast(self.generator.device.type, enabled=False):
            return cayley(self.skew_generator(), self.mode, self.neumann_terms)

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*self.rotation_blocks())

    def adapt(self, weight: torch.Tensor) -> torch.Tensor:
        out_features, in_features = weight.shape
        n, b, _ = self.generator.shape
        per_block = weight.reshape(out_features, n, b)
        if self.mode == "exact":
            # W R = W (I + Q)(I - Q)^-1 = 2 W (I - Q)^-1 - W, and W (I - Q)^-1 = ((I + Q)^-1 W^T)^T
            # since Q^T = -Q: one solve with W as right-hand side instead of solving for R and then
            # multiplying by it (about 1.5x less work forward + backward for ViT c_proj blocks).
            with torch.autocast(weight.device.type, enabled=False):
                q = self.skew_generator()
                eye = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(q)
                solved = torch.linalg.solve(eye + q, per_block.float().permute(1, 2, 0))  # [n, b, out]
                rotated = 2 * solved.permute(2, 0, 1) - per_block.float()
            return rotated.reshape(out_features, in_features).to(weight.dtype)
        blocks = self.rotation_blocks().to(weight.dtype)
        # (W R) computed block by block: [out, n, b] x [n, b, b] -> [out, n, b]
        rotated = torch.einsum("onb,nbc->onc", per_block, blocks)
        return rotated.reshape(out_features, in_features)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R^T``, so that ``linear(x R^T, W) == linear(x, W R)`` (see ``surgery.rotate_inputs``)."""
        n, b, _ = self.generator.shape
        blocks = self.rotation_blocks().to(x.dtype)
        rotated = torch.einsum("...nb,ncb->...nc", x.reshape(*x.shape[:-1], n, b), blocks)
        return rotated.reshape(x.shape)

    def cheaper_on_input(self, out_features: int) -> bool:
        """Rotating the input costs about ``3 T in b`` multiply-adds per step (rotation, its two
        gradients); rotating the weight costs the full weight gradient, ``T in out``. Large T."""
        return 3 * self.generator.shape[-1] < out_features


@dataclass
class OrthogonalConfig(AdapterConfig):
    """OrthCR's orthogonal fine-tuning. Give ``blocks`` or ``block_size`` (not both; default 4 blocks)."""

    method: ClassVar[str] = "orthogonal"
    targets: tuple[str, ...] = FFN_TARGETS
    blocks: int | None = None
    block_size: int | None = None
    cayley: Literal["exact", "neumann"] = "exact"
    neumann_terms: int = 5
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.blocks is not None and self.block_size is not None:
            raise ValueError("give exactly one of blocks or block_size for the orthogonal adapter")
        if self.blocks is None and self.block_size is None:
            self.blocks = 4
        if self.cayley not in ("exact", "neumann"):
            raise ValueError(f"unknown Cayley mode {self.cayley!r}: use 'exact' or 'neumann'")

    def make(self, weight: torch.Tensor, slices: int) -> WeightAdapter:
        in_features = weight.shape[1]
        if self.blocks is not None:
            blocks = self.blocks
        else:
            if in_features % self.block_size:
                raise ValueError(f"input size {in_features} is not a multiple of block_size {self.block_size}")
            blocks = in_features // self.block_size
        return BlockRotation(in_features, blocks, self.cayley, self.neumann_terms, self.max_norm)
