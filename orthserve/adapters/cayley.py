"""The Cayley transform ``R = (I + Q)(I - Q)^-1`` of skew-symmetric ``Q``, batched and free of host syncs.

``R = 2 (I - Q)^-1 - I``, so the one hard part is the inverse ``X = (I - Q)^-1``. Two kernels give it
(``docs/CAYLEY.md`` has the measurements and the reasoning):

- ``"lu"``: ``torch.linalg.inv_ex`` (an LU factorization), without its error check, so nothing waits
  for the device. Fastest where LAPACK is (CPU).
- ``"newton"``: Newton-Schulz iterations ``X <- X (2I - M X)`` on ``M = I - Q``: matrix multiplies only,
  the work a GPU does best. ``M`` is normal with singular values ``sqrt(1 + sigma_i^2)`` (``sigma_i`` those
  of ``Q``), so the start ``X0 = alpha M^T`` with ``alpha = 2 / (2 + B)``, ``B >= |Q|_2^2``, converges for
  every ``Q``: the residual ``I - M X`` has spectral norm at most ``B / (2 + B)`` and squares with every
  iteration. ``B`` is the trace bound ``tr((Q^T Q)^8)^(1/8)`` (three multiplies, at most ``b^(1/8)`` times
  too large; computed on ``P / |Q|_F^2`` so that no power overflows). The first ``low_iterations`` run in ``low_dtype`` (bf16 on a GPU: they only need to bring the
  residual below about 1e-2), the last ``fp32_iterations`` in fp32, which restores full precision because
  each iteration squares the residual whatever produced it.

Both are exact to fp32 rounding: the same function as ``torch.linalg.solve(I - Q, I + Q)``, compared to
1e-5 in the tests. Newton-Schulz with the defaults (10 + 2 iterations) holds that up to ``|Q|_2`` of about
14 (rotation angles up to 172 degrees); beyond it the iterations have not converged and ``R`` is wrong:
training compares it with the LU kernel at every log interval (``--log-every`` steps and each epoch's end) and
switches the run to LU when they differ (``training.finetune.keep_orthogonal``; the switch lasts for the process:
a later load starts from ``auto`` again). The backward is the same for both, two multiplies with the saved
``X``: ``dL/dQ = 2 X^T G X^T`` for ``G = dL/dR``.
"""
from __future__ import annotations

from typing import Literal

import torch

Kernel = Literal["auto", "lu", "newton"]


def skew(generator: torch.Tensor) -> torch.Tensor:
    return generator - generator.transpose(-1, -2)


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def newton_inverse(q: torch.Tensor, low_iterations: int = 10, fp32_iterations: int = 2,
                   low_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(I - Q)^-1`` for skew-symmetric fp32 ``q [..., b, b]`` by Newton-Schulz iterations (no host sync)."""
    low = low_dtype or q.dtype
    eye = _eye_like(q)
    m = eye - q
    # B = tr(P^8)^(1/8), P = Q^T Q, computed on Q / |Q|_F (so that no power overflows) in the low precision
    norm = torch.linalg.matrix_norm(q, keepdim=True) + 1e-30
    scaled = (q / norm).to(low)
    p = -(scaled @ scaled)
    p2 = p @ p
    p4 = p2 @ p2
    bound = norm.square() * torch.linalg.matrix_norm(p4.float(), keepdim=True).pow(0.25)   # >= sigma_max(Q)^2
    bound = 1.05 * bound + 1e-6                            # low-precision rounding margin
    x = (2 / (2 + bound)) * (eye + q)                      # alpha M^T
    ml, two = m.to(low), 2 * eye.to(low)
    x = x.to(low)
    for _ in range(low_iterations):
        x = x @ (two - ml @ x)
    x = x.float()
    for _ in range(fp32_iterations):
        x = x @ (2 * eye - m @ x)
    return x


def resolve_kernel(kernel: Kernel, device: torch.device) -> str:
    """``auto``: Newton-Schulz on a GPU (matrix multiplies), LU elsewhere (LAPACK)."""
    if kernel == "auto":
        return "newton" if device.type == "cuda" else "lu"
    return kernel


def cayley_inverse(q: torch.Tensor, kernel: Kernel = "auto") -> torch.Tensor:
    """``(I - Q)^-1`` for fp32 skew-symmetric ``q``, with the kernel that suits ``q``'s device."""
    kernel = resolve_kernel(kernel, q.device)
    if kernel == "lu":
        return torch.linalg.inv_ex(_eye_like(q) - q)[0]
    if kernel == "newton":
        return newton_inverse(q, low_dtype=torch.bfloat16 if q.device.type == "cuda" else None)
    raise ValueError(f"unknown Cayley kernel {kernel!r}: use 'auto', 'lu' or 'newton'")


class _ExactCayley(torch.autograd.Function):
    """``R = 2 (I - Q)^-1 - I``; the backward reuses ``X = (I - Q)^-1`` (two multiplies, no solve)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, kernel: str) -> torch.Tensor:
        x = cayley_inverse(q, kernel)
        ctx.save_for_backward(x)
        return 2 * x - _eye_like(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        xt = x.transpose(-1, -2)
        return 2 * (xt @ grad.to(x.dtype) @ xt), None


def neumann_cayley(q: torch.Tensor, terms: int = 5) -> torch.Tensor:
    """``(I + Q)(I + Q + ... + Q^(k-2))``: k terms once expanded, as PEFT counts them. Only approximately
    orthogonal (the error grows like ``|Q|^k``); kept for comparison with PEFT's OFT."""
    eye = _eye_like(q)
    series, power = eye.clone(), eye
    for _ in range(terms - 2):
        power = power @ q
        series = series + power
    return (eye + q) @ series


def cayley(q: torch.Tensor, mode: str = "exact", neumann_terms: int = 5, kernel: Kernel = "auto") -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric ``q`` (``[..., b, b]``, computed in fp32)."""
    if mode not in ("exact", "neumann"):
        raise ValueError(f"unknown Cayley mode {mode!r}: use 'exact' or 'neumann'")
    with torch.profiler.record_function("orthserve::cayley"):  # counted by the tests and the GPU profile
        q = q.float()
        return _ExactCayley.apply(q, kernel) if mode == "exact" else neumann_cayley(q, neumann_terms)


def orthogonality_error(rotation_blocks: torch.Tensor) -> torch.Tensor:
    """``max |R^T R - I|`` over a batch of blocks, in fp32, as a device tensor (read it at log intervals)."""
    r = rotation_blocks.float()
    return (r.transpose(-1, -2) @ r - _eye_like(r)).abs().amax()
