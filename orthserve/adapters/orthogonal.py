"""OrthCR's orthogonal adapter: ``W' = W R`` with ``R`` block-diagonal and orthogonal.

``R`` acts on the input dimension of a ``[out, in]`` weight, so every output neuron
(row of W) is rotated the same way: row norms and the angles between rows are kept
(the "hyperspherical energy" argument of OFT).  Each ``b x b`` block is the Cayley
transform (:mod:`.cayley`) of a skew-symmetric ``Q = A - A^T`` built from a full ``b x b``
generator ``A`` (zero at init, so ``R = I``):

    R = (I + Q)(I - Q)^-1                      exact (to fp32 rounding)
    R ~ I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1) Neumann series of (I - Q)^-1, k terms

With ``max_norm`` set (the constrained "COFT" variant) ``Q`` is scaled down whenever
its Frobenius norm exceeds the bound, so R stays within a ball around the identity.

During training, :func:`batched_rotation_blocks` computes the blocks of many adapters in one
Cayley transform per block size (``orthserve.fast_rotations`` does it once per forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
from torch import nn

from .base import AdapterConfig, WeightAdapter
from .cayley import Kernel, cayley, resolve_kernel, skew

# The FFN linears of open_clip residual blocks, and their Hugging Face BERT twins.
FFN_TARGETS = (r"mlp\.c_fc$", r"mlp\.c_proj$", r"\.intermediate\.dense$", r"layer\.\d+\.output\.dense$")


def bounded_skew(generator: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``Q`` in fp32 (even under autocast), scaled into the COFT ball ``|Q|_F <= max_norm`` when set."""
    q = skew(generator.float())
    if max_norm is not None:
        norms = torch.linalg.matrix_norm(q, keepdim=True)
        q = q * torch.clamp(max_norm / (norms + 1e-12), max=1.0)
    return q


def batched_rotation_blocks(rotations: Sequence["BlockRotation"], kernel: Kernel | None = None) -> list[torch.Tensor]:
    """Every adapter's ``[blocks, b, b]`` rotation, with one Cayley transform per group of adapters that
    share block size and settings (on ViT-B-16 with 4 blocks: 4 calls for 48 adapted layers).
    ``kernel`` overrides the adapters' own choice of exact kernel."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rotations):
        key = (r.generator.shape[-1], r.mode, r.neumann_terms, r.max_norm, kernel or r.kernel)
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(rotations)
    for (_, mode, terms, max_norm, kernel), members in groups.items():
        generators = [rotations[i].generator for i in members]
        with torch.autocast(generators[0].device.type, enabled=False):
            blocks = cayley(bounded_skew(torch.cat(generators), max_norm), mode, terms, kernel)
        for i, part in zip(members, blocks.split([g.shape[0] for g in generators])):
            out[i] = part
    return out


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
        self.precomputed: torch.Tensor | None = None  # set for one forward pass by orthserve.fast_rotations
        # How the exact inverse is computed (cayley.cayley_inverse): "auto" picks by device. Not saved with the
        # adapter: every kernel computes the same R to fp32 rounding.
        self.kernel: Kernel = "auto"

    def skew_generator(self) -> torch.Tensor:
        return bounded_skew(self.generator, self.max_norm)

    def rotation_blocks(self) -> torch.Tensor:
        """The ``[blocks, b, b]`` orthogonal blocks in fp32: those precomputed for this forward pass by
        ``orthserve.fast_rotations``, else computed here."""
        if self.precomputed is not None:
            return self.precomputed
        return batched_rotation_blocks([self])[0]

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*self.rotation_blocks())

    def solves_weight(self) -> bool:
        """True where ``W R`` is cheaper as one LU solve with ``W`` as right-hand side than as ``R`` then a
        multiply: the exact transform on the LU kernel (CPU), applied to the weight. Forming ``R`` costs about
        ``4 b^3`` more per block forward and backward, 8% of a ViT-B-16 step on this CPU (docs/CAYLEY.md)."""
        return (self.mode == "exact" and not self.applied_to_input
                and resolve_kernel(self.kernel, self.generator.device) == "lu")

    def adapt(self, weight: torch.Tensor) -> torch.Tensor:
        out_features, in_features = weight.shape
        n, b, _ = self.generator.shape
        if self.solves_weight():
            # W R = 2 W (I - Q)^-1 - W, and W (I - Q)^-1 = ((I + Q)^-1 W^T)^T since Q^T = -Q
            per_block = weight.reshape(out_features, n, b)
            with torch.autocast(weight.device.type, enabled=False):
                q = self.skew_generator()
                eye = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(q)
                solved = torch.linalg.solve_ex(eye + q, per_block.float().permute(1, 2, 0))[0]  # [n, b, out]
                rotated = 2 * solved.permute(2, 0, 1) - per_block.float()
            return rotated.reshape(out_features, in_features).to(weight.dtype)
        blocks = self.rotation_blocks().to(weight.dtype)
        # (W R) computed block by block: [out, n, b] x [n, b, b] -> [out, n, b]
        rotated = torch.einsum("onb,nbc->onc", weight.reshape(out_features, n, b), blocks)
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

    method: ClassVar[str] = "orthcr"   # the training CLI's --method name (files before 0.1 wrote "orthogonal")
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
