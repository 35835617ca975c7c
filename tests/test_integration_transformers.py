"""transformers: SharpnessAwareTrainer gives samkit's own step on the same micro-batches for every
method, with gradient accumulation, logs the clean loss and clips the final gradient (issue 13);
Momentum-SAM evaluates and checkpoints at w and resumes, K-SAM forwards only its top-k samples."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from integration_helpers import (
    METHODS,
    assert_same_weights,
    make_optimizer,
    method_kwargs,
    reference_run,
    tiny_data,
    tiny_model,
)

from samkit.integrations.transformers import PERTURBED_FILE, SharpnessAwareTrainer


class Net(torch.nn.Module):
    """The tiny MLP behind the Trainer's calling convention: model(x=...) -> logits."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.head = mlp.head

    def forward(self, x, labels=None):
        return self.mlp(x)


class Recording(SharpnessAwareTrainer):
    """Records the micro-batches the Trainer hands over, in order, to replay them in the reference."""

    seen: list

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append((inputs["x"].clone(), inputs["labels"].clone()))
        return super().training_step(model, inputs, num_items_in_batch)


def dataset(n=32):
    x, y = tiny_data(n)
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=0.01,
                    weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                    use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                    disable_tqdm=True, remove_unused_columns=False, seed=0)
    return transformers.TrainingArguments(**{**defaults, **kwargs})


ADAMW = dict(base=torch.optim.AdamW, lr=0.01, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)


def train(tmp_path, method, **kwargs):
    mlp = tiny_model()
    ref = copy.deepcopy(mlp)
    trainer = Recording(model=Net(mlp), args=args(tmp_path, **kwargs), train_dataset=dataset(),
                        method=method, method_kwargs=method_kwargs(method, mlp))
    trainer.seen = []
    trainer.train()
    k = trainer.args.gradient_accumulation_steps
    windows = [trainer.seen[i:i + k] for i in range(0, len(trainer.seen), k)]
    return trainer, mlp, ref, windows


@pytest.mark.parametrize("method", list(METHODS))
def test_accumulation_equals_samkit_step(tmp_path, method):
    trainer, mlp, ref, windows = train(tmp_path, method)
    assert trainer.state.global_step == 2 and len(windows) == 2
    reference_run(method, ref, windows, **ADAMW)
    assert_same_weights(mlp, ref)


def test_logged_loss_is_the_clean_loss_and_clipping_acts_on_the_final_gradient(tmp_path):
    trainer, mlp, ref, windows = train(tmp_path, "focalsam", max_grad_norm=0.05)
    first = trainer.state.log_history[0]
    x = torch.cat([xb for xb, _ in windows[0]])
    y = torch.cat([yb for _, yb in windows[0]])
    clean = torch.nn.functional.cross_entropy(ref(x), y).item()
    assert first["loss"] == pytest.approx(clean, rel=1e-6)
    assert first["grad_norm"] > 0.05  # the norm before clipping
    opt = make_optimizer("focalsam", ref, **ADAMW)

    def clip(*_):
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)

    opt.base.register_step_pre_hook(clip)
    for window in windows:
        opt.step([lambda xb=xb: ref(xb) for xb, _ in window], [yb for _, yb in window])
    assert_same_weights(mlp, ref)


def test_a_samkit_optimizer_given_whole_is_used(tmp_path):
    mlp = tiny_model()
    ref = copy.deepcopy(mlp)
    opt = make_optimizer("imbsam", mlp)  # SGD with momentum as the base
    trainer = Recording(model=Net(mlp), args=args(tmp_path), train_dataset=dataset(),
                        optimizers=(opt, None))
    trainer.seen = []
    trainer.train()
    windows = [trainer.seen[i:i + 2] for i in range(0, len(trainer.seen), 2)]
    reference_run("imbsam", ref, windows)
    assert_same_weights(mlp, ref)


def test_a_plain_torch_optimizer_is_refused(tmp_path):
    mlp = tiny_model()
    trainer = SharpnessAwareTrainer(
        model=Net(mlp), args=args(tmp_path), train_dataset=dataset(),
        optimizers=(torch.optim.SGD(mlp.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="expected a samkit optimizer"):
        trainer.train()


def test_bf16_runs_every_pass_under_autocast(tmp_path):
    x, y = tiny_data(16, dtype=torch.float32)
    mlp = tiny_model(dtype=torch.float32)
    ref = copy.deepcopy(mlp)
    data = [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]
    trainer = Recording(model=Net(mlp), args=args(tmp_path, bf16=True, max_steps=1,
                                                  per_device_train_batch_size=16,
                                                  gradient_accumulation_steps=1),
                        train_dataset=data, method="focalsam", base=torch.optim.SGD,
                        method_kwargs=method_kwargs("focalsam", mlp))
    trainer.seen = []
    trainer.train()
    (xb, yb), = trainer.seen
    opt = make_optimizer("focalsam", ref, lr=0.01)  # SGD: the base given to the Trainer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: ref(xb), yb)
    assert_same_weights(mlp, ref, atol=1e-7)
    fp32 = tiny_model(dtype=torch.float32)  # and bf16 mattered: a float32 step lands elsewhere
    make_optimizer("focalsam", fp32, lr=0.01).step(lambda: fp32(xb), yb)
    assert not torch.allclose(fp32.body[0].weight, mlp.body[0].weight, rtol=0, atol=1e-7)


class Evaluated(Recording):
    """Records the head's weights each evaluation sees, and the rows each forward gets."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.evaluated.append(model.mlp.head.weight.detach().clone())
        return None, None, None


class Savable(torch.nn.Module):
    """Net without the head's second name (safetensors refuses shared tensors)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, labels=None):
        return self.mlp(x)


def test_momentum_sam_evaluates_and_checkpoints_at_w_and_resumes(tmp_path):
    starts = []

    class Start(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            starts.append(copy.deepcopy(model.mlp.state_dict()))

    def run(out, resume=None):
        mlp = tiny_model()
        trainer = Evaluated(
            model=Savable(mlp), train_dataset=dataset(), eval_dataset=dataset(8), method="msam",
            method_kwargs=method_kwargs("msam", mlp), callbacks=[Start()],
            args=args(out, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                      save_steps=1, per_device_eval_batch_size=8, num_train_epochs=2))
        trainer.seen, trainer.evaluated = [], []
        trainer.train(resume_from_checkpoint=resume)
        return trainer, mlp

    trainer, mlp = run(tmp_path / "whole")
    assert trainer.state.global_step == 4 and len(trainer.evaluated) == 4
    k = trainer.args.gradient_accumulation_steps
    windows = [trainer.seen[i:i + k] for i in range(0, len(trainer.seen), k)]
    # samkit's own steps, looking at w after each: what evaluation and checkpoint must see
    ref = tiny_model()
    opt = make_optimizer("msam", ref, **ADAMW)
    for i, window in enumerate(windows):
        opt.step([lambda xb=xb: ref(xb) for xb, _ in window], [yb for _, yb in window])
        if i == 0:
            perturbed_after_one = copy.deepcopy(ref.state_dict())
        with opt.at_w():
            torch.testing.assert_close(trainer.evaluated[i], ref.head.weight, rtol=0, atol=0)
            if i == 0:
                at_w_after_one = copy.deepcopy(ref.state_dict())
    opt.to_w()
    assert_same_weights(mlp, ref)  # train() ends at w, evaluation did not move the run
    from safetensors.torch import load_file

    first = tmp_path / "whole" / "checkpoint-1"
    saved = load_file(first / "model.safetensors")
    for key, value in at_w_after_one.items():
        torch.testing.assert_close(saved[f"mlp.{key}"], value, rtol=0, atol=0, msg=key)
    # beside them, w~ and the optimizer's state there: resuming continues bit for bit
    held = torch.load(first / PERTURBED_FILE, weights_only=True)
    assert held["extra"]["at_perturbed"] is True
    names = {id(p): n for n, p in mlp.named_parameters()}  # the optimizer's order: its groups
    order = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    for saved_p, name in zip(held["params"], order, strict=True):
        torch.testing.assert_close(saved_p, perturbed_after_one[name], rtol=0, atol=0, msg=name)
    _, resumed = run(tmp_path / "again", resume=str(first))
    for key, value in perturbed_after_one.items():  # the resumed run starts from w~
        torch.testing.assert_close(starts[1][key], value, rtol=0, atol=0, msg=key)
    assert_same_weights(resumed, mlp, atol=0)


def test_ksam_forwards_only_its_top_k_samples(tmp_path):
    rows = []

    class Counting(Net):
        def forward(self, x, labels=None):
            rows.append(x.shape[0])
            return super().forward(x)

    mlp = tiny_model()
    ref = copy.deepcopy(mlp)
    trainer = Recording(model=Counting(mlp), args=args(tmp_path, max_steps=1),
                        train_dataset=dataset(), method="ksam",
                        method_kwargs=method_kwargs("ksam", mlp))
    trainer.seen = []
    trainer.train()
    # per micro-batch of 8: the ranking pass, then the two passes on its share of the top k = 8
    assert len(rows) == 6 and rows[:2] == [8, 8] and sum(rows[2:]) == 16
    assert rows[2:4] == rows[4:] and max(rows[2:]) < 8
    reference_run("ksam", ref, [trainer.seen], **ADAMW)
    assert_same_weights(mlp, ref)
