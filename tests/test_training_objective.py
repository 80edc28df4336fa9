"""The OrthCR objective: KL terms vanish at initialization, Cutout masks what it says, loss falls."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import orthserve
from training.data import TrainImages, few_shot, load_labelled
from training.finetune import lr_lambda, train_step
from training.objective import (CrossEntropyObjective, OrthCRConfig, OrthCRObjective, attentive_cutout,
                                random_cutout)
from orthserve.preprocess import PreprocessSpec


def classifier_with(tiny, *configs, classes=("daisy", "dandelion", "rose")):
    model, _, tokenizer = tiny
    classifier = orthserve.CLIPClassifier(model, tokenizer, list(classes))
    for config in configs:
        orthserve.inject(classifier, config)
    return classifier


@pytest.mark.parametrize("cutout", ["random", "attentive"])
@pytest.mark.parametrize("taskres", [False, True])
def test_kl_terms_are_zero_at_initialization(tiny, cutout, taskres):
    configs = [orthserve.OrthogonalConfig()] + ([orthserve.TaskResConfig()] if taskres else [])
    classifier = classifier_with(tiny, *configs)
    objective = OrthCRObjective(classifier, OrthCRConfig(cutout=cutout), torch.Generator().manual_seed(0))
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loss, logits, parts = objective(classifier, images, torch.tensor([0, 1, 2, 0]))
    assert abs(parts["kl"].item()) < 1e-6 and abs(parts["kl_cutout"].item()) < 1e-6
    assert torch.allclose(loss, parts["ce"] + parts["ce_cutout"], atol=1e-5)
    with torch.no_grad(), orthserve.bypass(classifier):
        assert torch.allclose(logits, classifier(images), atol=1e-5)


def test_kl_is_positive_once_adapted(tiny):
    classifier = classifier_with(tiny, orthserve.OrthogonalConfig())
    objective = OrthCRObjective(classifier, OrthCRConfig(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in orthserve.adapter_parameters(classifier).values():
            p.normal_(0, 0.1)
    _, _, parts = objective(classifier, torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))
    assert parts["kl"] > 1e-4 and parts["kl_cutout"] > 1e-4


def test_without_cutout_one_pass_gives_the_two_view_loss(tiny):
    """--cutout none: the second view is the image itself, so one pass gives the same loss and gradients."""
    classifier = classifier_with(tiny, orthserve.OrthogonalConfig())
    with torch.no_grad():
        for p in orthserve.adapter_parameters(classifier).values():
            p.normal_(0, 0.05)
    images, labels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    results = []
    for config in (OrthCRConfig(cutout="none"), OrthCRConfig(cutout="random", cutout_prob=0.0)):  # no mask drawn
        classifier.zero_grad()
        loss, _, parts = OrthCRObjective(classifier, config, torch.Generator().manual_seed(0))(classifier, images, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in orthserve.adapter_parameters(classifier).values()]))
    (one_pass, one_grads), (two_views, two_grads) = results
    assert parts["kl"] > 1e-4 and torch.allclose(one_pass, two_views, atol=1e-5)
    for a, b in zip(one_grads, two_grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_random_cutout_masks_a_square_of_the_given_size():
    images = torch.ones(64, 3, 20, 20)
    cut = random_cutout(images, 0.5, 1.0, torch.rand(len(images), 3, generator=torch.Generator().manual_seed(0)))
    masked = (cut[:, 0] == 0).sum(dim=(1, 2))
    assert masked.max() == 100 and masked.min() > 0  # 10x10 when inside, clipped at borders
    assert (cut[:, 0] == cut[:, 1]).all()  # all channels alike
    assert torch.equal(random_cutout(images, 0.5, 0.0, torch.rand(len(images), 3)), images)


def test_attentive_cutout_masks_the_most_class_like_patches():
    images = torch.ones(2, 3, 16, 16)  # a 4x4 grid of 4-pixel patches
    similarity = torch.zeros(2, 4, 4)
    similarity[0, 2:4, 1:3] = 1.0  # image 0: class evidence at rows 2-3, cols 1-2
    similarity[1, 0, 0] = 1.0      # image 1: top-left corner
    cut = attentive_cutout(images, similarity, 0.5, 1.0, torch.rand(len(images)))
    expected = torch.ones(2, 16, 16)
    expected[0, 8:16, 4:12] = 0
    expected[1, 0:8, 0:8] = 0
    assert torch.equal(cut[:, 0], expected)
    assert torch.equal(attentive_cutout(images, similarity, 0.5, 0.0, torch.rand(len(images))), images)


def test_lr_schedule_warms_up_then_decays():
    values = [lr_lambda(s, warmup=4, total=20, floor=0.1) for s in range(21)]
    assert values[0] < values[3] < values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and abs(values[-1] - 0.1) < 1e-9


@pytest.mark.parametrize("method", ["orthcr", "lora"])
def test_loss_falls_on_a_fixed_batch(tiny, sample_images, method):
    data = load_labelled(sample_images / "flowers5", subsample="base")
    shots, _ = few_shot(data, 3, seed=1)
    spec = PreprocessSpec.from_model(tiny[0])
    dataset = TrainImages(shots, spec, seed=0, augment=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    config = orthserve.OrthogonalConfig() if method == "orthcr" else orthserve.LoRAConfig(rank=4)
    classifier = classifier_with(tiny, config)
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4 if method == "orthcr" else 2e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    generator = torch.Generator()
    objective = (OrthCRObjective(classifier, OrthCRConfig(), generator) if method == "orthcr"
                 else CrossEntropyObjective())
    losses = []
    for _ in range(6):
        generator.manual_seed(0)  # the same Cutout views every step: a truly fixed batch
        loss, _, _ = train_step(classifier, objective, optimizer, scheduler, scaler, images, labels, nullcontext, 1.0)
        losses.append(loss)
    assert losses[-1] < (0.95 if method == "orthcr" else 0.9) * losses[0], losses
    assert min(losses[1:]) < losses[0]
