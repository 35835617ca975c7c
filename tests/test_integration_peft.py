"""Foundation-model fine-tuning: a tiny CLIP-style vision tower (random init, from a config folder)
with LoRA and a linear head trains with Focal-SAM; only adapter and head parameters change or are
perturbed; the recipe runs end to end in `samkit train` (issue 13, item 5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import samkit.optim as so
from samkit.integrations.peft import build_adapted_vit
from samkit.train.config import load_config
from samkit.train.loop import Trainer, make_model

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "imagenet_lt_clip_lora_focal.yaml"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    transformers.CLIPVisionConfig(**TINY).save_pretrained(folder)
    return folder


def _counts():
    return [40, 20, 10, 5]


def test_only_adapter_and_head_are_trained_and_perturbed(clip_folder):
    torch.manual_seed(0)
    model = build_adapted_vit(str(clip_folder), 4, in_channels=1, random_init=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen_seen, lora_seen = [], []

    def record(module, args):
        frozen_seen.append(torch.cat([p.detach().flatten() for p in frozen]).clone())
        lora_seen.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                                    if "lora_B" in n]).clone())

    model.register_forward_pre_hook(record)
    opt = so.FocalSAM(model.parameters(), class_counts=_counts(), rho=0.05, gamma=0.5, lam=0.8,
                      lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 28, 28, generator=g)  # grey 28x28: repeated to 3 channels, resized to 32
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = [float(opt.step(lambda: model(x), y).loss) for _ in range(4)]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n  # every adapter and head tensor moved
        else:
            assert torch.equal(p, before[n]), n
    # every forward (clean and perturbed) saw the frozen weights unchanged; the perturbed ones saw
    # another adapter than the clean pass of the same step
    assert all(torch.equal(f, frozen_seen[0]) for f in frozen_seen)
    assert not torch.equal(lora_seen[2], lora_seen[3])


def test_vit_and_preprocessing(tmp_path):
    transformers.ViTConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    model = build_adapted_vit(str(tmp_path), 3, head="normed", random_init=True)
    x = torch.rand(2, 3, 20, 20)
    pre = model.preprocess(x)
    assert pre.shape == (2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(pre[:, 1], (resized[:, 1] - 0.2) / 0.5)
    assert model(x).shape == (2, 3)
    assert {n.split(".")[-2] for n, p in model.named_parameters()
            if p.requires_grad and "lora_" in n} == {"default"}
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(2, 2, 20, 20))


def test_recipe_runs_end_to_end_in_samkit_train(tmp_path, clip_folder, tiny_fmnist):
    config = load_config(RECIPE, [
        "data.name=fashion-mnist", f"data.root={tiny_fmnist}", "data.limit_per_class=40",
        "data.ratio=10", "data.batch_size=32", "data.eval_batch_size=200", "schedule.epochs=1",
        f"model.name=hf:{clip_folder}", "model.kwargs.random_init=true",
        f"run.out={tmp_path}", "run.name=clip"])
    assert config.optim.method == "focalsam" and config.schedule.epochs == 1
    summary = Trainer(config, progress=False).run()
    metrics = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").open()]
    assert summary["method"] == "focalsam" and len(metrics) == 1
    assert math.isfinite(metrics[0]["train_loss"]) and 0.0 <= metrics[0]["overall"] <= 1.0
    assert metrics[0]["nonfinite_steps"] == 0
    saved = torch.load(tmp_path / "clip" / "checkpoint.pt", weights_only=True)["model"]
    assert any("lora_A" in k for k in saved) and "head.weight" in saved


def test_hf_models_refuse_dataset_normalisation(clip_folder):
    config = load_config(RECIPE, ["data.normalize=true", f"model.name=hf:{clip_folder}",
                                  "model.kwargs.random_init=true"])
    with pytest.raises(ValueError, match="data.normalize=false"):
        make_model(config, 10, 1)
