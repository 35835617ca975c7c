"""Lightning: every method in automatic optimization (with accumulate_grad_batches) and manual
optimization gives samkit's own step on the same batches, logs the clean pass only, advances
global_step, and works with gradient clipping, bf16 and checkpoint resume (issue 13, items 2-3);
Momentum-SAM validates and checkpoints at w, K-SAM forwards only its top-k samples."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from integration_helpers import (
    METHODS,
    assert_same_weights,
    make_optimizer,
    reference_run,
    tiny_data,
    tiny_model,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from samkit.integrations.lightning import SharpnessAwareModule


class Lit(SharpnessAwareModule):
    def __init__(self, net, method, manual=False, calls=None, **base):
        super().__init__()
        self.net, self.method, self.base = net, method, base
        self.automatic_optimization = not manual
        self.calls = calls

    def forward(self, x):
        if self.calls is not None:
            self.calls.append(x.shape[0])
        return self.net(x)

    def configure_optimizers(self):
        return make_optimizer(self.method, self.net, **self.base)


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def loader(x, y, batch=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def windows(x, y, batch, accumulate, epochs):
    xs, ys = x.split(batch), y.split(batch)
    per_epoch = [list(zip(xs[i:i + accumulate], ys[i:i + accumulate]))
                 for i in range(0, len(xs), accumulate)]
    return per_epoch * epochs, [e for e in range(epochs) for _ in per_epoch]


@pytest.mark.parametrize("method", list(METHODS))
def test_automatic_accumulation_equals_samkit_step(method):
    x, y = tiny_data(32)
    net = tiny_model()
    ref = reference_run(method, copy.deepcopy(net), *windows(x, y, 8, 2, 2))
    module = Lit(net, method)
    t = trainer(max_epochs=2, accumulate_grad_batches=2)
    t.fit(module, loader(x, y))
    assert t.global_step == 4
    assert_same_weights(net, ref)


@pytest.mark.parametrize("method", ["sam", "focalsam", "bisam", "msam", "ksam"])
def test_manual_optimization_equals_samkit_step_and_counts_steps(method):
    x, y = tiny_data(24)
    net = tiny_model()
    ref = reference_run(method, copy.deepcopy(net), *windows(x, y, 8, 1, 1))
    t = trainer(max_epochs=1)
    t.fit(Lit(net, method, manual=True), loader(x, y))
    assert t.global_step == 3
    assert_same_weights(net, ref)


def test_logged_metrics_come_from_the_clean_pass_only():
    x, y = tiny_data(16)
    net = tiny_model()
    clean = copy.deepcopy(net)
    calls = []
    module = Lit(net, "focalsam", calls=calls)
    t = trainer(max_steps=1)
    t.fit(module, loader(x, y, batch=16))
    # Focal-SAM's passes: one clean and one perturbed forward, nothing else
    assert calls == [16, 16]
    logits = clean(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    acc = (logits.argmax(1) == y).double().mean()
    torch.testing.assert_close(t.logged_metrics["train_loss"], loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(t.logged_metrics["train_acc"].double(), acc, rtol=0, atol=1e-6)


def test_gradient_clipping_clips_the_final_gradient():
    x, y = tiny_data(16)
    net = tiny_model()
    ref = copy.deepcopy(net)
    t = trainer(max_steps=1, gradient_clip_val=0.01)
    t.fit(Lit(net, "sam"), loader(x, y, batch=16))
    opt = make_optimizer("sam", ref)

    def clip(*_):
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)

    opt.base.register_step_pre_hook(clip)
    opt.step(lambda: ref(x), y)
    assert_same_weights(net, ref)
    assert not torch.allclose(net.head.weight, make_optimizer_free_step(x, y).head.weight)


def make_optimizer_free_step(x, y):
    """The same SAM step without clipping (to show that clipping changed the update)."""
    net = tiny_model()
    make_optimizer("sam", net).step(lambda: net(x), y)
    return net


def test_bf16_mixed_runs_the_step_under_autocast():
    x, y = tiny_data(16, dtype=torch.float32)
    net = tiny_model(dtype=torch.float32)
    ref = copy.deepcopy(net)
    t = trainer(max_steps=1, precision="bf16-mixed", accumulate_grad_batches=2)
    t.fit(Lit(net, "focalsam"), loader(x, y))
    opt = make_optimizer("focalsam", ref)
    plain = copy.deepcopy(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step([lambda: ref(x[:8]), lambda: ref(x[8:])], [y[:8], y[8:]])
    assert_same_weights(net, ref, atol=1e-7)
    # and bf16 mattered: the float32 step differs
    make_optimizer("focalsam", plain).step([lambda: plain(x[:8]), lambda: plain(x[8:])],
                                          [y[:8], y[8:]])
    assert not torch.allclose(net.body[0].weight, plain.body[0].weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["focalsam", "msam", "looksam", "fsam"])
def test_checkpoint_holds_w_and_resume_continues_exactly(tmp_path, method):
    # the checkpoint of epoch 1 is written mid-run: Momentum-SAM's model then holds w~; LookSAM's
    # step counter and F-SAM's gradient average are in the optimizer state
    x, y = tiny_data(32)
    whole = tiny_model()
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[every_epoch])
    t.fit(Lit(whole, method), loader(x, y))
    first = tmp_path / "epoch=0.ckpt"
    saved = torch.load(first, weights_only=False)
    ref = reference_run(method, tiny_model(), windows(x, y, 8, 1, 1)[0])  # 4 steps, then at w
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][f"net.{key}"], value, rtol=0, atol=0,
                                   msg=key)
    resumed = tiny_model(seed=5)
    again = trainer(max_epochs=3)
    again.fit(Lit(resumed, method), loader(x, y), ckpt_path=first)
    assert again.global_step == 12
    assert_same_weights(resumed, whole, atol=0)  # bit for bit


class Scheduled(Lit):
    """The lr decays every step: GSAM's radius follows it (rho at lr_max, rho_min at lr 0)."""

    def configure_optimizers(self):
        opt = make_optimizer(self.method, self.net)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - 0.2 * step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_gsam_radius_follows_the_learning_rate_schedule():
    x, y = tiny_data(32)
    net = tiny_model()
    ref = copy.deepcopy(net)
    t = trainer(max_epochs=1)
    t.fit(Scheduled(net, "gsam"), loader(x, y))
    opt = make_optimizer("gsam", ref)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - 0.2 * step)
    radii = []
    for xb, yb in zip(x.split(8), y.split(8)):
        radii.append(opt.radius(opt.param_groups[0]))
        opt.step(lambda xb=xb: ref(xb), yb)
        decay.step()
    assert radii == pytest.approx([0.1, 0.084, 0.068, 0.052])  # rho_min + (rho - rho_min) lr/lr_0
    assert_same_weights(net, ref)


class StartRecorded(Lit):
    """Records the weights training starts from (after a checkpoint is restored)."""

    def on_train_start(self):
        self.start = copy.deepcopy(self.net.state_dict())


def test_momentum_sam_resume_starts_from_w_tilde_and_loading_gives_w(tmp_path):
    x, y = tiny_data(32)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(max_epochs=2, enable_checkpointing=True, callbacks=[every_epoch])
    t.fit(Lit(tiny_model(), "msam"), loader(x, y))
    first = tmp_path / "epoch=0.ckpt"
    # samkit's own 4 steps: the model holds w~, at_w() shows w
    ref = tiny_model()
    opt = make_optimizer("msam", ref)
    for xb, yb in zip(x.split(8), y.split(8)):
        opt.step(lambda xb=xb: ref(xb), yb)
    perturbed = copy.deepcopy(ref.state_dict())
    with opt.at_w():
        at_w = copy.deepcopy(ref.state_dict())
    module = StartRecorded(tiny_model(seed=5), "msam")
    trainer(max_epochs=2).fit(module, loader(x, y), ckpt_path=first)
    for key, value in perturbed.items():
        torch.testing.assert_close(module.start[key], value, rtol=0, atol=0, msg=key)
    # outside a fit (load_from_checkpoint, validate, test) the checkpoint gives w
    checkpoint = torch.load(first, weights_only=False)
    Lit(tiny_model(), "msam").on_load_checkpoint(checkpoint)
    assert "samkit_at_perturbed" not in checkpoint
    for key, value in at_w.items():
        torch.testing.assert_close(checkpoint["state_dict"][f"net.{key}"], value, rtol=0, atol=0)
    assert not torch.equal(at_w["head.weight"], perturbed["head.weight"])


class Validated(Lit):
    """Records the head's weights each validation sees."""

    def __init__(self, net, method):
        super().__init__(net, method)
        self.seen = []

    def validation_step(self, batch, batch_idx):
        self.seen.append(self.net.head.weight.detach().clone())


def test_momentum_sam_validates_at_w_and_trains_on_exactly():
    x, y = tiny_data(16)
    net = tiny_model()
    module = Validated(net, "msam")
    t = trainer(max_epochs=2)
    t.fit(module, loader(x, y), loader(x[:8], y[:8], batch=8))
    ref = tiny_model()
    opt = make_optimizer("msam", ref)
    at_w = []
    for _ in range(2):
        for xb, yb in zip(x.split(8), y.split(8)):
            opt.step(lambda xb=xb: ref(xb), yb)
        with opt.at_w():
            at_w.append(ref.head.weight.detach().clone())
    assert len(module.seen) == 2
    for seen, expected in zip(module.seen, at_w):
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    # validating did not move training: the run ends where the unvalidated reference does (at w)
    opt.to_w()
    assert_same_weights(net, ref, atol=0)
    assert not torch.equal(at_w[1], make_optimizer_free_step(x, y).head.weight)


def test_ksam_forwards_only_its_top_k_samples():
    x, y = tiny_data(16)
    calls = []
    net = tiny_model()
    ref = reference_run("ksam", copy.deepcopy(net), [[(x, y)]])
    t = trainer(max_steps=1)
    t.fit(Lit(net, "ksam", calls=calls), loader(x, y, batch=16))
    # the ranking pass on all 16; the two passes on k = 8 (fraction 0.5) forward only those
    assert calls == [16, 8, 8]
    assert_same_weights(net, ref)


DDP_SCRIPT = """
import sys, torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from integration_helpers import tiny_data, tiny_model
from test_integration_lightning import Lit

x, y = tiny_data(32)
net = tiny_model()
t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
               accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False)
t.fit(Lit(net, "focalsam"), DataLoader(TensorDataset(x, y), batch_size=8))
if t.global_rank == 0:
    torch.save({"state": net.state_dict(), "steps": t.global_step}, sys.argv[1])
"""


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "weights.pt"
    run = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["steps"] == 2
    # each window: both processes' 2 batches of 8, i.e. all 32 samples; one step per epoch
    x, y = tiny_data(32)
    ref = reference_run("focalsam", tiny_model(), [[(x, y)], [(x, y)]], [0, 1])
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(saved["state"][key], value, rtol=0, atol=1e-12, msg=key)
