"""The harness at scale: micro-batches, mixed precision, compilation, channels-last, and several
processes (torchrun and torch.multiprocessing on the gloo backend)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import generated_fashion, tiny  # noqa: F401 (autouse fixture)

from samkit.train.checkpoint import load_checkpoint
from samkit.train.config import ConfigError, load_config
from samkit.train.loop import Interrupted, Trainer

TESTS = Path(__file__).resolve().parent
NO_NORM = ["model.name=tiny_models:mlp", "data.augment=none", "optim.method=focalsam",
           "optim.kwargs={rho: 0.1}"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_close_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def test_micro_batches_give_the_same_run(tmp_path: Path) -> None:
    one = Trainer(load_config(None, tiny(tmp_path / "one", *NO_NORM)), progress=False)
    three = Trainer(load_config(None, tiny(tmp_path / "three", *NO_NORM, "run.accumulate=3")),
                    progress=False)
    one.run(), three.run()
    assert_close_weights(weights(tmp_path / "one/tiny"), weights(tmp_path / "three/tiny"))
    summary = json.loads((tmp_path / "three/tiny/summary.json").read_text())
    assert summary["forwards_per_step"] == 2 * 3  # Focal-SAM's 2 forwards, on 3 micro-batches


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path: Path, amp: str) -> None:
    summary = Trainer(load_config(None, tiny(tmp_path, "optim.method=sam", "optim.kwargs={}",
                                             f"run.amp={amp}")), progress=False).run()
    assert summary["last"]["overall"] > 0.15 and summary["steps"] == 12
    ckpt = load_checkpoint(tmp_path / "tiny/checkpoint.pt")
    assert ("grad_scaler" in ckpt) == (amp == "fp16")
    if amp == "fp16":
        assert ckpt["grad_scaler"]["scale"] > 0


def test_compiled_run_equals_eager(tmp_path: Path) -> None:
    common = ["optim.method=imbsam", "optim.kwargs={}", "optim.norm_stats=freeze"]
    Trainer(load_config(None, tiny(tmp_path / "eager", *common)), progress=False).run()
    Trainer(load_config(None, tiny(tmp_path / "compiled", *common, "run.compile=aot_eager")),
            progress=False).run()
    assert_close_weights(weights(tmp_path / "eager/tiny"), weights(tmp_path / "compiled/tiny"))


def test_channels_last_run(tmp_path: Path) -> None:
    # CPU convolutions in channels-last round differently (1e-4 after one plain SGD step here), so
    # runs are not compared; tests/test_optim_scale.py checks every method's step in float64
    trainer = Trainer(load_config(None, tiny(tmp_path, "optim.method=sam", "optim.kwargs={}",
                                             "run.channels_last=true")), progress=False)
    summary = trainer.run()
    assert trainer.model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert summary["last"]["overall"] > 0.15


@pytest.mark.parametrize(
    "override, match",
    [("run.amp=fp8", "run.amp must be none, bf16 or fp16"),
     ("run.accumulate=0", "run.accumulate must be >= 1"),
     ("run.accumulate=100", "run.accumulate must be >= 1 and <= data.batch_size")],
)
def test_scale_settings_are_checked(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.batch_size=64", override])


# ---- several processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_samkit_train_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """`samkit train` unchanged under torchrun: two processes (with a compiled DDP model) train
    like one uncompiled process on the same global batches; only rank 0 writes the run."""
    recipe = tiny(tmp_path / "ddp", *NO_NORM, "run.threads=1", "run.compile=aot_eager")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "samkit", "train", "--quiet", *recipe],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("last epoch: overall") == 1  # rank 0 alone reports
    Trainer(load_config(None, tiny(tmp_path / "one", *NO_NORM, "run.threads=1")),
            progress=False).run()
    assert_close_weights(weights(tmp_path / "ddp/tiny"), weights(tmp_path / "one/tiny"))
    assert json.loads((tmp_path / "ddp/tiny/env.json").read_text())["processes"] == 2
    one = json.loads((tmp_path / "one/tiny/metrics.jsonl").read_text().splitlines()[-1])
    two = json.loads((tmp_path / "ddp/tiny/metrics.jsonl").read_text().splitlines()[-1])
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)  # over both processes
    assert two["overall"] == pytest.approx(one["overall"], abs=2e-3)


def _train(rank: int, port: int, overrides: list[str], resume: bool, stop_at: tuple | None,
           out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def interrupt(trainer: Trainer, epoch: int, step: int) -> None:
        if rank == 1 and (epoch, step) == stop_at:  # the signal reaches one process only
            os.kill(os.getpid(), signal.SIGINT)

    trainer = Trainer(load_config(None, overrides), resume=resume, progress=False,
                      on_step=interrupt)
    try:
        trainer.run()
        result = "finished"
    except Interrupted:
        result = "interrupted"
    Path(out, f"rank{rank}").write_text(result)


def spawn(overrides: list[str], out: Path, resume: bool = False, stop_at=None) -> list[str]:
    mp.spawn(_train, args=(free_port(), overrides, resume, stop_at, str(out)), nprocs=2)
    return [(out / f"rank{r}").read_text() for r in range(2)]


def test_interrupted_distributed_run_resumes_exactly(tmp_path: Path) -> None:
    """SIGINT on one process stops both at the same step; rank 0's checkpoint resumes both."""
    straight = tiny(tmp_path / "a", *NO_NORM, "run.max_steps_per_epoch=5")
    stopped = tiny(tmp_path / "b", *NO_NORM, "run.max_steps_per_epoch=5")
    assert spawn(straight, tmp_path) == ["finished"] * 2
    assert spawn(stopped, tmp_path, stop_at=(1, 2)) == ["interrupted"] * 2
    assert load_checkpoint(tmp_path / "b/tiny/checkpoint.pt")["progress"]["step"] == 2
    assert spawn(stopped, tmp_path, resume=True) == ["finished"] * 2
    a, b = weights(tmp_path / "a/tiny"), weights(tmp_path / "b/tiny")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = [[{k: v for k, v in json.loads(x).items() if not k.endswith("time_s")}
                for x in (root / "tiny/metrics.jsonl").read_text().splitlines()]
               for root in (tmp_path / "a", tmp_path / "b")]
    assert metrics[0] == metrics[1]
