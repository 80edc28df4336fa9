"""The exact Cayley transform: the same rotations as the solve it replaced, orthogonal, batched, no host sync."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import orthserve
from orthserve.adapters import BlockRotation, batched_rotation_blocks, orthogonality_error
from orthserve.adapters.cayley import cayley, newton_inverse, skew
from orthserve.surgery import adapter_parameters, set_cayley_kernel

FIXTURES = Path(__file__).parent / "fixtures"
# Block sides in use: orthserve-tiny (16, 64), PEFT's default (32), ViT-B-16 with 4 blocks (128, 192, 512, 768).
BLOCK_SIZES = (16, 32, 64, 128, 192, 512, 768)


def solve_cayley(q: torch.Tensor) -> torch.Tensor:
    """The exact transform as computed before the batched kernels (torch.linalg.solve), autograd and all."""
    eye = torch.eye(q.shape[-1]).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q)


def generator_with_norm(blocks: int, size: int, spectral: float, seed: int = 0) -> torch.Tensor:
    """A random generator A whose Q = A - A^T has the given largest spectral norm over its blocks."""
    a = torch.randn(blocks, size, size, generator=torch.Generator().manual_seed(seed))
    return a * (spectral / torch.linalg.matrix_norm(skew(a), ord=2).max())


@pytest.mark.parametrize("kernel", ["lu", "newton"])
@pytest.mark.parametrize("size,spectral", [(16, 0.05), (64, 1.0), (192, 3.0)])
def test_exact_kernels_give_the_solve_values_and_gradients(kernel, size, spectral):
    a = generator_with_norm(3, size, spectral)
    upstream = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))
    grads, values = [], []
    for transform in (solve_cayley, lambda q: cayley(q, "exact", kernel=kernel)):
        generator = a.clone().requires_grad_(True)
        r = transform(skew(generator))
        (r * upstream).sum().backward()
        values.append(r.detach())
        grads.append(generator.grad)
    assert (values[0] - values[1]).abs().max() < 1e-5
    assert (grads[0] - grads[1]).abs().max() < 1e-5 * max(1.0, grads[0].abs().max().item())


@pytest.mark.parametrize("size", BLOCK_SIZES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_rotations_are_orthogonal_for_every_block_size(size, autocast):
    """LU (CPU) and Newton-Schulz with bf16 iterations (as on a GPU), generators up to |Q|_2 = 5."""
    rotations = []
    for kernel in ("lu", "newton"):
        for spectral in (0.01, 5.0):
            rotation = BlockRotation(size, 1)
            rotation.generator.data = generator_with_norm(1, size, spectral, seed=size)
            rotation.kernel = kernel
            rotations.append(rotation)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        blocks = batched_rotation_blocks(rotations)
    for rotation, r in zip(rotations, blocks):
        assert r.dtype == torch.float32
        assert orthogonality_error(r) < 1e-5, (rotation.kernel, size)
    for rotation in rotations[2:]:  # the GPU's arithmetic: bf16 iterations, then fp32 (auto uses fp32 on a CPU)
        q = rotation.skew_generator()
        r = 2 * newton_inverse(q, low_dtype=torch.bfloat16) - torch.eye(size)
        assert orthogonality_error(r) < 1e-5 and (r - solve_cayley(q)).abs().max() < 1e-5, size


def test_newton_schulz_range_and_what_happens_beyond_it():
    """Exact to 1e-5 up to |Q|_2 of about 14 on 768-blocks (the documented range); far beyond it the
    iterations have not converged and R is wrong, and training's log-interval check switches to LU."""
    eye = torch.eye(768)
    for spectral, holds in ((10.0, True), (60.0, False), (1e4, False)):
        q = skew(generator_with_norm(1, 768, spectral))
        r = 2 * newton_inverse(q, low_dtype=torch.bfloat16) - eye
        assert torch.isfinite(r).all()
        assert ((r - solve_cayley(q)).abs().max() < 1e-5) == holds, spectral

    from training.finetune import keep_orthogonal

    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    classifier = orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog"])
    orthserve.inject(classifier, orthserve.OrthogonalConfig(blocks=1))
    with torch.no_grad():
        for param in adapter_parameters(classifier).values():
            param.copy_(generator_with_norm(1, param.shape[-1], 400.0))
    set_cayley_kernel(classifier, "newton")
    assert orthserve.surgery.max_kernel_drift(classifier) > 1e-5
    keep_orthogonal(classifier, "exact")
    assert orthserve.max_orthogonality_error(classifier) < 1e-5
    assert orthserve.surgery.max_kernel_drift(classifier) == 0
    assert {m.kernel for m in classifier.modules() if isinstance(m, BlockRotation)} == {"lu"}


def test_an_adapter_file_saved_before_the_batched_transform_gives_the_same_model():
    """tests/fixtures/orthogonal-4896f2c.*: written by the code at 4896f2c (linalg.solve per layer), with
    generators of |Q|_2 up to about 7, together with the logits it gave on fixed pixels."""
    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    classifier = orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog", "bird"], ["a photo of a {}."])
    orthserve.load_adapters(FIXTURES / "orthogonal-4896f2c.safetensors", classifier)
    expected = load_file(str(FIXTURES / "orthogonal-4896f2c.expected.safetensors"))
    classifier.eval()
    with torch.no_grad():
        assert (classifier(expected["images"]) - expected["logits"]).abs().max() < 1e-5
        with orthserve.fast_rotations(classifier):
            assert (classifier(expected["images"]) - expected["logits"]).abs().max() < 1e-5
    assert orthserve.max_orthogonality_error(classifier) < 1e-5


def tiny_classifier(targets: tuple[str, ...]) -> orthserve.CLIPClassifier:
    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    classifier = orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog", "bird"])
    orthserve.inject(classifier, orthserve.OrthogonalConfig(targets=targets))
    with torch.no_grad():
        for param in adapter_parameters(classifier).values():
            param.normal_(0, 0.02)
    return classifier


@pytest.mark.parametrize("kernel", ["auto", "newton"])
def test_batched_rotations_compute_the_same_logits_and_gradients(kernel):
    """Per layer and batched alike; ``newton``: as on a GPU, every layer's R from the batched transform."""
    classifier = tiny_classifier(orthserve.OrthogonalConfig().targets)
    set_cayley_kernel(classifier, kernel)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    for context in (nullcontext, lambda: orthserve.fast_rotations(classifier)):
        classifier.zero_grad()
        with context():
            logits = classifier(images)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in adapter_parameters(classifier).values()]))
    assert (results[0][0] - results[1][0]).abs().max() < 1e-5
    for plain, batched in zip(results[0][1], results[1][1]):  # fp32 rounding, relative to the gradient's size
        assert (plain - batched).abs().max() < 1e-5 * max(1.0, plain.abs().max().item())


def cayley_calls(classifier: orthserve.CLIPClassifier) -> int:
    """Cayley transforms in one forward and backward, with the GPU's kernel (on the CPU's, the weight-side
    layers solve with their weight per layer instead: cheaper there, and a CPU launches nothing)."""
    set_cayley_kernel(classifier, "newton")
    images = torch.randn(2, 3, 64, 64)
    with orthserve.fast_rotations(classifier), torch.profiler.profile() as prof:
        classifier(images).sum().backward()
    return sum(1 for e in prof.events() if e.name == "orthserve::cayley")


def test_cayley_calls_do_not_grow_with_the_adapted_layers():
    """One batched transform per block size (16 and 64 on orthserve-tiny), for 1 layer or all 8."""
    one_block = (r"resblocks\.0\.mlp\.c_fc$", r"resblocks\.0\.mlp\.c_proj$")
    few, every = tiny_classifier(one_block), tiny_classifier(orthserve.OrthogonalConfig().targets)
    assert sum(isinstance(m, BlockRotation) for m in every.modules()) == 8
    assert sum(isinstance(m, BlockRotation) for m in few.modules()) == 4
    assert cayley_calls(few) == cayley_calls(every) == 2


def host_reads(prof) -> list[str]:
    """``_local_scalar_dense`` events and the ops they ran under, except inside the CPU build of fused AdamW,
    which reads its step counter from host memory (its CUDA kernel reads it on the device: no sync there)."""
    reads = []
    for event in prof.events():
        if event.name != "aten::_local_scalar_dense":
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if "aten::_fused_adamw_" not in parents:
            reads.append(" <- ".join(parents[:4]))
    return reads


@pytest.mark.parametrize("method", ["orthcr", "orthcr-attentive", "lora"])
def test_training_steps_never_wait_for_the_device(method):
    """The profiler sees no ``_local_scalar_dense`` (what ``.item()``, ``float(t)`` or ``if t:`` run) in
    steps between log intervals; reading the sums at the interval is the one sync. The rotations use the
    GPU's kernel (Newton-Schulz): the CPU's LAPACK LU reads host scalars internally, which is no device sync."""
    from training.finetune import DeviceSums, make_optimizer, train_step
    from training.objective import CrossEntropyObjective, OrthCRConfig, OrthCRObjective

    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    classifier = orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog", "bird"])
    orthserve.inject(classifier, orthserve.LoRAConfig() if method == "lora" else orthserve.OrthogonalConfig())
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = make_optimizer([{"params": params, "lr": 1e-3}], 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    objective = (CrossEntropyObjective() if method == "lora" else OrthCRObjective(
        classifier, OrthCRConfig(cutout="attentive" if method.endswith("attentive") else "random"), torch.Generator()))
    set_cayley_kernel(classifier, "newton")
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    sums = DeviceSums()
    with orthserve.fast_rotations(classifier), torch.profiler.profile() as prof:
        for _ in range(3):
            sums.add(*train_step(classifier, objective, optimizer, scheduler, scaler, images, labels, nullcontext, 1.0),
                     images=len(labels))
    assert host_reads(prof) == []
    means = sums.means()
    assert set(means) >= {"loss", "acc"} and all(map(lambda v: v == v, means.values()))
