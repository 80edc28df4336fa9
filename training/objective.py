"""Training objectives: plain cross-entropy, and OrthCR's cross-regularized objective.

OrthCR loss on a batch ``x`` with labels ``y``, ``x_c`` its Cutout views:

    CE(f(x), y) + CE(f(x_c), y) + lambda1 * KL(f0(x) || f(x)) + lambda2 * KL(f0(x_c) || f(x_c))

``f`` is the adapted classifier, ``f0`` the frozen pretrained one.  ``f0`` is the same
module with its adapters switched off (:func:`orthserve.bypass`) under ``no_grad``: no
second copy of the model.  Its class embeddings never change, so they are computed once.
KL terms are ``sum_c p0_c (log p0_c - log p_c)`` averaged over the batch; at
initialization every adapter is the identity, so ``f == f0`` and both KL terms are zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import orthserve

from .distributed import unwrap

CUTOUT_MODES = ("random", "attentive", "none")


@dataclass
class OrthCRConfig:
    lambda1: float = 1.5            # KL weight on original views (the paper's value)
    lambda2: float = 1.0            # KL weight on Cutout views (the paper's value)
    cutout: Literal["random", "attentive", "none"] = "random"
    cutout_size: float = 0.5        # side of the square, as a fraction of the image side
    cutout_prob: float = 1.0        # probability that an image gets a mask at all


# --------------------------------------------------------------------------- Cutout

def random_cutout(images: torch.Tensor, size: float, prob: float, draw: torch.Tensor) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017) on normalized pixels.

    For each image, with probability ``prob``: a square of side ``round(size * H)`` pixels,
    its centre uniform over the whole image (so the square may be clipped at the border),
    is set to 0, i.e. the normalization mean colour.  ``draw [B, 3]``: uniform numbers in [0, 1)
    (centre row, centre column, whether to mask), drawn by the caller so that this function
    has no random state of its own (``torch.compile`` traces it whole).  Returns a new tensor.
    """
    _, _, height, width = images.shape
    side = max(1, round(size * min(height, width)))
    rows = torch.arange(height, device=images.device)[None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, :]
    cy = (draw[:, 0] * height).long()[:, None, None]
    cx = (draw[:, 1] * width).long()[:, None, None]
    half = side // 2
    mask = (rows >= cy - half) & (rows < cy - half + side) & (cols >= cx - half) & (cols < cx - half + side)
    mask &= (draw[:, 2] < prob)[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


def patch_text_similarity(patch_tokens: torch.Tensor, visual: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, grid, grid]`` of each patch token (after ``ln_post`` and the
    image projection, as for the class token) with one text embedding per image ``text [B, D]``."""
    tokens = visual.ln_post(patch_tokens)
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    tokens = F.normalize(tokens.float(), dim=-1)
    similarity = (tokens * F.normalize(text.float(), dim=-1)[:, None, :]).sum(-1)
    grid = int(round(similarity.shape[1] ** 0.5))
    return similarity.view(-1, grid, grid)


def attentive_cutout(images: torch.Tensor, similarity: torch.Tensor, size: float, prob: float,
                     draw: torch.Tensor) -> torch.Tensor:
    """Mask the square, aligned to the patch grid, whose patches are most similar to the class.

    ``similarity [B, g, g]`` comes from :func:`patch_text_similarity` of the frozen model's
    patch tokens and the image's own class text embedding.  The square is ``k = max(1,
    round(size * g))`` patches on a side; among all ``(g-k+1)^2`` positions the one with
    the largest summed similarity is set to 0 (the mean colour), with probability ``prob``
    (``draw [B]``: uniform numbers in [0, 1), one per image).
    Hiding the most class-like evidence forces the adapted model to use the rest of the image.
    """
    _, _, height, width = images.shape
    grid = similarity.shape[-1]
    k = max(1, min(grid, round(size * grid)))
    scores = F.avg_pool2d(similarity[:, None], kernel_size=k, stride=1)[:, 0]  # [B, g-k+1, g-k+1]
    best = scores.flatten(1).argmax(dim=1)
    top, left = best // scores.shape[-1], best % scores.shape[-1]
    patch_h, patch_w = height // grid, width // grid
    rows = torch.arange(height, device=images.device)[None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, :]
    y0, x0 = (top * patch_h)[:, None, None], (left * patch_w)[:, None, None]
    mask = (rows >= y0) & (rows < y0 + k * patch_h) & (cols >= x0) & (cols < x0 + k * patch_w)
    keep = draw < prob
    return images.masked_fill((mask & keep[:, None, None])[:, None], 0.0)


class PatchTokens:
    """Keeps the ViT's token sequence (output of ``visual.transformer``) of the passes run while
    ``capturing`` is set.

    The forward hook is registered once, for the objective's lifetime: registering it per step would
    change the module's hooks every step and make ``torch.compile`` recompile. Works for open_clip
    ``VisionTransformer`` towers (class token first, then the patch grid).
    """

    def __init__(self, visual: nn.Module) -> None:
        if not hasattr(visual, "transformer") or not hasattr(visual, "ln_post") or not hasattr(visual, "class_embedding"):
            raise ValueError("attentive Cutout needs an open_clip VisionTransformer image tower "
                             f"(got {type(visual).__name__}); use --cutout random")
        self.visual, self.tokens, self.capturing = visual, None, False
        self.handle = visual.transformer.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        if self.capturing:
            self.tokens = output

    def patches(self, batch: int) -> torch.Tensor:
        """``[batch, grid*grid, width]`` patch tokens (class token dropped; sequence-first layouts transposed)."""
        tokens = self.tokens if self.tokens.shape[0] == batch else self.tokens.transpose(0, 1)
        return tokens[:, 1:]


# --------------------------------------------------------------------------- objective

def frozen_class_embeddings(classifier: orthserve.CLIPClassifier) -> torch.Tensor:
    """The pretrained model's class embeddings (adapters bypassed); constant during training."""
    with torch.no_grad(), orthserve.bypass(classifier):
        return classifier.class_embeddings().detach().float()


def kl_frozen_adapted(frozen_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(frozen || adapted), averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(frozen_logits.float(), dim=-1),
                    log_target=True, reduction="batchmean")


class OrthCRObjective:
    """Callable ``(classifier, images, labels) -> (loss, logits on original views, parts)``.

    The call draws the Cutout randomness (from ``generator``, on its device) and hands it to
    :meth:`loss`, which has no random state: that is the part ``torch.compile`` compiles.
    """

    def __init__(self, classifier: orthserve.CLIPClassifier, config: OrthCRConfig, generator: torch.Generator) -> None:
        if config.cutout not in CUTOUT_MODES:
            raise ValueError(f"unknown cutout mode {config.cutout!r}: use one of {', '.join(CUTOUT_MODES)}")
        self.config, self.generator = config, generator
        self.frozen_text = frozen_class_embeddings(classifier)
        self.tokens = PatchTokens(classifier.model.visual) if config.cutout == "attentive" else None

    def frozen_logits(self, classifier: orthserve.CLIPClassifier, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), orthserve.bypass(classifier):
            image = classifier.image_features(images)
            return classifier.model.logit_scale.exp() * image.float() @ self.frozen_text.T

    def draws(self, images: torch.Tensor) -> torch.Tensor | None:
        """This batch's Cutout randomness: ``[B, 3]`` (random) or ``[B]`` (attentive) uniform numbers."""
        shape = {"random": (len(images), 3), "attentive": (len(images),)}.get(self.config.cutout)
        if shape is None:
            return None
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(images.device)

    def cutout_views(self, classifier, images, labels, frozen_tokens, draws) -> torch.Tensor:
        c = self.config
        if c.cutout == "random":
            return random_cutout(images, c.cutout_size, c.cutout_prob, draws)
        if c.cutout == "attentive":
            similarity = patch_text_similarity(frozen_tokens, classifier.model.visual, self.frozen_text[labels])
            return attentive_cutout(images, similarity, c.cutout_size, c.cutout_prob, draws)
        raise AssertionError(f"no Cutout views for mode {c.cutout!r}")

    def __call__(self, classifier, images, labels):
        return self.loss(classifier, images, labels, self.draws(images))

    def loss(self, model, images, labels, draws):
        """``model``: the classifier, or ``DistributedDataParallel`` around it; the adapted passes go through it
        (gradients all-reduced), the frozen passes and attributes use the classifier inside."""
        c, classifier = self.config, unwrap(model)
        if c.cutout == "none":  # the "Cutout view" is the image itself: one pass, the same loss value
            frozen = frozen_cut = self.frozen_logits(classifier, images)
            logits = logits_cut = model(images).float()
        else:
            if self.tokens is not None:  # attentive: the mask needs the frozen patch tokens first
                self.tokens.capturing = True
                frozen = self.frozen_logits(classifier, images)
                self.tokens.capturing = False
                patches, self.tokens.tokens = self.tokens.patches(len(images)).detach(), None
                cut = self.cutout_views(classifier, images, labels, patches, draws)
                frozen_cut = self.frozen_logits(classifier, cut)
            else:  # one frozen pass over both views
                cut = self.cutout_views(classifier, images, labels, None, draws)
                frozen, frozen_cut = self.frozen_logits(classifier, torch.cat([images, cut])).chunk(2)
            logits_all = model(torch.cat([images, cut]))  # one adapted pass over both views
            logits, logits_cut = logits_all.float().chunk(2)
        parts = {
            "ce": F.cross_entropy(logits, labels),
            "ce_cutout": F.cross_entropy(logits_cut, labels),
            "kl": kl_frozen_adapted(frozen, logits),
            "kl_cutout": kl_frozen_adapted(frozen_cut, logits_cut),
        }
        loss = parts["ce"] + parts["ce_cutout"] + c.lambda1 * parts["kl"] + c.lambda2 * parts["kl_cutout"]
        return loss, logits, parts


class CrossEntropyObjective:
    """What LoRA, AOFT, TaskRes and full fine-tuning optimize."""

    def draws(self, images: torch.Tensor) -> None:
        return None

    def __call__(self, classifier, images, labels):
        return self.loss(classifier, images, labels, None)

    def loss(self, classifier, images, labels, draws):
        logits = classifier(images).float()
        loss = F.cross_entropy(logits, labels)
        return loss, logits, {"ce": loss}
