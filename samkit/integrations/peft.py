"""Foundation-model fine-tuning: a pretrained vision transformer (a transformers CLIP vision tower or
ViT) with a LoRA adapter (the peft library) and a linear head, as a samkit model.

Focal-SAM's foundation-model setting (Li et al., ICML 2025, after LIFT) fine-tunes CLIP ViT-B/16 with
a parameter-efficient adapter for 20 epochs; only the adapter and the classifier are trained, and so
only they are perturbed and stepped: the backbone's weights are frozen (requires_grad False), and
samkit's optimizers perturb and step exactly the parameters that require gradients. LoRA (Hu et al.,
ICLR 2022) stands in for the paper's AdaptFormer: W x + (alpha / r) B A x on the attention projections,
B initialised to zero so training starts from the pretrained model.

Images arrive as the harness makes them (float in [0, 1], any size, 1 or 3 channels); the model
repeats a grey channel, resizes to the backbone's ``image_size`` and normalises with its own mean and
std (the folder's ``preprocessor_config.json``, else the model family's published values), so a
recipe sets ``data.normalize=false``.

In ``samkit train``: ``model.name=hf:<local folder or hub name>``, options under ``model.kwargs``
(see :func:`build_adapted_vit`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from samkit.models.heads import make_head

#: the published preprocessing of each family: OpenAI CLIP, and Google's ViT (0.5 per channel)
FAMILY_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
#: the attention projections LoRA adapts by default (their names in transformers 5, then in 4.x)
LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"))


class AdaptedViT(nn.Module):
    """Backbone (frozen, with a LoRA adapter) -> pooled image feature -> ``head``.

    ``features(x)`` gives the head's input and ``head`` runs last, once per forward, so CC-SAM's
    classifier form works too.
    """

    def __init__(self, backbone: nn.Module, family: str, image_size: int, channels: int,
                 mean: Sequence[float], std: Sequence[float], head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.image_size = image_size
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.head = head

    def preprocess(self, x: Tensor) -> Tensor:
        """[0, 1] images of any size -> the backbone's input: channels, size, normalisation."""
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(
                    f"the backbone takes {self.channels} channels; got {x.shape[1]} (1 channel "
                    "is repeated, other counts need converting first)"
                )
            x = x.expand(-1, self.channels, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: Tensor) -> Tensor:
        out = self.backbone(pixel_values=self.preprocess(x))
        if self.family == "clip":
            return out.pooler_output  # the class token after CLIP's post-layernorm
        return out.last_hidden_state[:, 0]  # ViT: the class token after the final layernorm

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _family(config: Any) -> tuple[str, Any]:
    """("clip" or "vit", the vision config) of a transformers config."""
    if isinstance(config, CLIPVisionConfig):
        return "clip", config
    if getattr(config, "model_type", None) == "clip":
        return "clip", config.vision_config
    if isinstance(config, ViTConfig):
        return "vit", config
    raise ValueError(
        f"model type {getattr(config, 'model_type', type(config).__name__)!r} is not supported: "
        "give a CLIP (or CLIP vision) or ViT checkpoint"
    )


def _stats(source: str, family: str) -> tuple[Sequence[float], Sequence[float]]:
    """The image mean and std: the folder's preprocessor_config.json, else the family's."""
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return cfg["image_mean"], cfg["image_std"]
    return FAMILY_STATS[family]


def build_adapted_vit(
    source: str,
    num_classes: int,
    in_channels: int = 3,
    head: str = "linear",
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    random_init: bool = False,
) -> AdaptedViT:
    """A CLIP vision tower or ViT from `source` with a LoRA adapter and a `head` over `num_classes`.

    Args:
        source: a local folder (``save_pretrained`` output) or a model-hub name, e.g.
            ``openai/clip-vit-base-patch16`` (the paper's CLIP ViT-B/16) or
            ``google/vit-base-patch16-224``. A whole CLIP checkpoint gives its vision tower.
        num_classes, head: the classifier (``"linear"`` or ``"normed"``) on the pooled feature.
        in_channels: the data's channels (1 is repeated to the backbone's 3).
        rank, alpha, dropout: LoRA's r, alpha (the update is scaled by alpha / r) and dropout.
        target_modules: the module names LoRA adapts (default: the query and value projections).
        random_init: build the architecture from the config with random weights (offline tests,
            no weights needed); otherwise the pretrained weights are loaded.
    """
    del in_channels  # any channel count is handled in preprocess
    family, vision = _family(AutoConfig.from_pretrained(source))
    cls = CLIPVisionModel if family == "clip" else ViTModel
    extra = {} if family == "clip" else {"add_pooling_layer": False}
    if random_init:
        backbone = cls(vision, **extra)
    else:
        backbone = cls.from_pretrained(source, **extra)
    if target_modules is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
        target_modules = next((t for t in LORA_TARGETS if set(t) <= names), LORA_TARGETS[0])
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules))
    adapted = get_peft_model(backbone, lora)  # freezes every backbone weight but LoRA's
    mean, std = _stats(source, family)
    return AdaptedViT(adapted, family, vision.image_size, vision.num_channels, mean, std,
                      make_head(head, vision.hidden_size, num_classes))
