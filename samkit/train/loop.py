"""The training loop: a long-tailed data set, a model, a loss and any samkit method, as a run.

A run directory holds the resolved recipe (config.yaml), the environment (env.json), how the
long-tailed split was made (split.json), metrics per epoch (metrics.jsonl), the final summary
(summary.json), checkpoints written atomically (checkpoint.pt: the last one; best.pt: the weights of
the best epoch) and plots (plots/*.png). A run stopped by SIGINT/SIGTERM saves where it stands and
resumes exactly; repeated non-finite steps stop it without touching the last good checkpoint.

Under torchrun (WORLD_SIZE > 1) every process builds the same split and the same global batches;
each trains on its slice of every batch (data.batch_size is the global batch), the optimizer
averages gradients over processes, and rank 0 alone evaluates, logs and writes the run.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import json
import math
import os
import platform
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import samkit
import samkit.optim as so
from samkit.losses import build_loss
from samkit.models import build_model
from samkit.train.checkpoint import load_checkpoint, save_checkpoint, write_json
from samkit.train.config import Config
from samkit.train.data import Data, make_loaders, prepare_data  # noqa: F401 (Data: a public name)
from samkit.train.metrics import expected_calibration_error, group_accuracy, per_class_accuracy
from samkit.train.progress import RunDisplay, is_terminal, say
from samkit.train.records import read_metrics
from samkit.train.schedules import lr_factor, rho_at

CHECKPOINT, BEST, SUMMARY, METRICS = "checkpoint.pt", "best.pt", "summary.json", "metrics.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); its last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped; resume continues it."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved in {run_dir}")
        self.run_dir = run_dir


def import_user_module(module: str) -> Any:
    """Import the user's `module`, found among the installed packages or, failing that, in the
    current folder, as `python -m` would find it.

    The current folder is appended to the END of sys.path, and only when the module is not found
    otherwise: a file in the folder can never shadow an installed package or the standard
    library (a stray `torch.py` beside the data changes nothing). Importing runs the module's
    code, as any Python import does: name only modules you trust.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0]:
            raise  # the module was found; something it imports is missing
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
        importlib.invalidate_caches()
    return importlib.import_module(module)


def make_model(config: Config, num_classes: int, in_channels: int) -> nn.Module:
    """A model of samkit's by name, or the user's own as "package.module:factory" (called with
    whichever of num_classes, in_channels and head it accepts), found as import_user_module
    finds it."""
    name = config.model.name
    if ":" not in name:
        return build_model(name, num_classes=num_classes, in_channels=in_channels,
                           head=config.model.head)
    module, _, attr = name.partition(":")
    try:
        factory = getattr(import_user_module(module), attr)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"model.name={name}: cannot import {module} ({err}); run samkit from the folder "
            f"that holds {module.replace('.', '/')}.py, or add that folder to PYTHONPATH"
        ) from None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model.name={name}: cannot import {attr} from {module} ({err})") from None
    offered = {"num_classes": num_classes, "in_channels": in_channels, "head": config.model.head}
    wanted = inspect.signature(factory).parameters
    model = factory(**{k: v for k, v in offered.items() if k in wanted})
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name={name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_optimizer(config: Config, model: nn.Module, counts: list[int],
                   loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                   wrapped: nn.Module | None = None,
                   grad_scaler: torch.amp.GradScaler | None = None) -> so.SharpnessAware:
    """The configured method over the model's parameters, given what its constructor asks for.
    `wrapped` is the model the steps call (its DistributedDataParallel wrapper, say)."""
    o = config.optim
    cls = so.get(o.method)
    wanted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(o.kwargs)
    if "class_counts" in wanted:
        kwargs.setdefault("class_counts", counts)
    if "total_epochs" in wanted:
        kwargs.setdefault("total_epochs", config.schedule.epochs)
    if "head" in wanted and kwargs.get("form", "classifier") == "classifier":
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"{o.method} (classifier form) needs a model with a .head module; "
                             "set optim.kwargs.form=full for any model")
        kwargs.setdefault("head", head)
    if o.base == "sgd":
        base, base_kwargs = torch.optim.SGD, {"momentum": o.momentum, "nesterov": o.nesterov}
    else:
        base, base_kwargs = torch.optim.AdamW, {}
    known = set(wanted) | set(inspect.signature(so.SharpnessAware.__init__).parameters)
    unknown = sorted(set(o.kwargs) - known)
    if unknown:
        raise ValueError(
            f"optim.kwargs.{unknown[0]} is not a parameter of {cls.__name__}; its parameters: "
            f"{', '.join(p for p in wanted if p not in ('self', 'params', 'base', 'kwargs'))}"
        )
    # named parameters: an adaptive ascent (ASAM) follows its authors' rule, scaling only weights
    return cls(model.named_parameters(), base=base, lr=o.lr, weight_decay=o.weight_decay,
               loss_fn=loss_fn, skip_nonfinite=True, norm_stats=o.norm_stats,
               model=wrapped if wrapped is not None else model, grad_scaler=grad_scaler,
               **base_kwargs, **kwargs)


def environment(device: torch.device, world: int = 1) -> dict[str, Any]:
    """Versions, machine and device, recorded with every run."""
    env = {"samkit": samkit.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": str(device), "processes": world,
           "argv": sys.argv}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def resolve_device(name: str) -> torch.device:
    """run.device as a device; under torchrun, "auto" and "cuda" mean the process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={name} but CUDA is not available; use run.device=cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device) -> bool:
    """Join the process group that torchrun describes (WORLD_SIZE > 1); True if this call
    created it. NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between steps; a second SIGINT
    interrupts at once."""
    flag = {"stop": False}
    if not _is_main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Trainer:
    """Runs one recipe in one run directory (`run.out`/`run.name`).

    Args:
        config: the validated recipe.
        resume: continue the run found in the directory (a finished run is left as it is);
            without it an existing run directory is an error.
        progress: show progress bars (drawn only when stderr is a terminal; elsewhere a plain
            progress line a minute at most) with the run's estimated remaining time.
        verbose: print a result line per epoch and messages (False, with progress=False: silent).
        on_step: called after every step with (trainer, epoch, step), epoch the 0-based index of
            the epoch and step the steps taken in it; for tools and tests.

    Epochs are shown from 1. Stored epochs count completed epochs: the checkpoint's
    progress["epoch"] is the number of epochs finished, and a metrics.jsonl record's "epoch" (as
    summary.json's last/best "epoch") is the 1-based number of the epoch it closes. Run directories
    of samkit 0.1.0, whose records count from 0, are read as such and rewritten when resumed.
    """

    def __init__(self, config: Config, *, resume: bool = False, progress: bool = True,
                 verbose: bool = True,
                 on_step: Callable[[Trainer, int, int], None] | None = None) -> None:
        self.config = config
        self.resume = resume
        self.progress = progress
        self.verbose = verbose
        self.on_step = on_step
        self.run_dir = Path(config.run.out) / config.run.name
        self.rank, self.world = 0, 1

    def log(self, message: str) -> None:
        if self.verbose:
            say(message)

    def _resume_message(self) -> str:
        done, epochs = self.state["epoch"], self.config.schedule.epochs
        if done >= epochs:
            return f"resuming {self.run_dir}: all {epochs} epochs trained"
        return (f"resuming {self.run_dir} at epoch {done + 1}/{epochs}, after step "
                f"{self.state['step']}")

    # ----------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        c = self.config
        if isinstance(c.run.threads, int):  # else torch's own default (None or "auto")
            torch.set_num_threads(c.run.threads)
        if c.run.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(c.run.seed)
        self.device = resolve_device(c.run.device)
        self.owns_group = init_distributed(self.device)
        self.rank, self.world = _world()
        self.progress = self.progress and self.rank == 0
        self.verbose = self.verbose and self.rank == 0
        if c.data.batch_size % self.world:
            raise ValueError(
                f"data.batch_size={c.data.batch_size} (the global batch) must be divisible by "
                f"the {self.world} processes"
            )
        self.data = prepare_data(c, progress=self.progress and is_terminal(sys.stderr))
        self.num_classes = self.data.train.num_classes
        in_channels = self.data.in_channels
        self.model = make_model(c, self.num_classes, in_channels).to(self.device)
        self.memory_format = torch.channels_last if c.run.channels_last else torch.preserve_format
        if c.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(c.loss.name, class_counts=self.data.counts,
                                  **c.loss.kwargs).to(self.device)
        # what the steps call: the model, wrapped for several processes, compiled
        self.net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        wrapped = self.net if self.world > 1 else None  # the optimizer runs it under no_sync()
        if c.run.compile:
            backend = "inductor" if c.run.compile is True else c.run.compile
            self.net = torch.compile(self.net, backend=backend)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.run.amp)
        self.scaler = (torch.amp.GradScaler(self.device.type) if c.run.amp == "fp16" else None)
        self.optimizer = make_optimizer(
            c, self.model, self.data.counts, self.loss_fn,
            wrapped=wrapped, grad_scaler=self.scaler)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.loader, self.test_loader = make_loaders(c, self.data, self.device, self.rank,
                                                     self.world)

    def _forward(self, x: Tensor) -> Tensor:
        """The closure's forward: counted, on the model the steps call."""
        self.state["forwards"] += 1
        return self.net(x)

    def _closures(self, x: Tensor, y: Tensor) -> tuple[Any, Any]:
        """This process's slice of a global batch, as one closure or as micro-batches."""
        if self.world > 1 and not getattr(self.loader, "sliced", False):
            x, y = x.chunk(self.world)[self.rank], y.chunk(self.world)[self.rank]
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        k = self.config.run.accumulate
        # `index`: K-SAM forwards only the samples it selected
        if k == 1:
            return (lambda index=None: self._forward(x if index is None else x[index])), y
        return [
            lambda index=None, xi=xi: self._forward(xi if index is None else xi[index])
            for xi in x.chunk(k)
        ], list(y.chunk(k))

    def _fresh_state(self) -> dict[str, Any]:
        # epoch: epochs completed; epoch_numbering 1: records count from 1 (older runs: from 0)
        return {"epoch": 0, "epoch_numbering": 1, "step": 0, "global_step": 0, "train_time": 0.0,
                "seen": 0, "forwards": 0,
                "nonfinite": 0, "consecutive_nonfinite": 0, "best": None,
                "loss_sum": 0.0, "correct": 0, "counted": 0}

    def _checkpoint(self, path: Path, weights_only: bool = False) -> None:
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict()}
        if not weights_only:
            state.update({
                "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                "progress": dict(self.state), "rng": torch.get_rng_state(),
                "config": self.config.to_dict(),
            })
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(path, state)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if _comparable(ckpt.get("config")) != _comparable(self.config.to_dict()):
            raise ValueError(
                f"the run in {self.run_dir} was made with another recipe; resume it with the "
                "recipe in its config.yaml (samkit train --resume RUN_DIR), or start a new run"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        if self.scaler is not None and "grad_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        old_numbering = "epoch_numbering" not in ckpt["progress"]  # samkit 0.1.0: from 0
        self.state = {**self._fresh_state(), **ckpt["progress"]}
        if old_numbering and self.state["best"] is not None:
            self.state["best"] = {**self.state["best"], "epoch": self.state["best"]["epoch"] + 1}
        if self.rank != 0:  # the epoch's running sums so far are rank 0's (reduced when saved)
            self.state.update(loss_sum=0.0, correct=0, counted=0)
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        # metrics.jsonl may hold epochs after the checkpoint (a crash after the log line)
        if self.rank == 0:
            lines = read_metrics(self.run_dir)
            kept = [m for m in lines if m["epoch"] <= self.state["epoch"]]
            _write_metrics(self.run_dir, kept)

    def _prepare_run_dir(self) -> dict[str, Any] | None:
        """Create or reopen the run directory; return the summary of a finished run to resume.
        With several processes rank 0 decides and sends the others what it found."""
        if self.world == 1:
            return self._open_run_dir()
        found: list[Any] = [None, None, None]  # error, finished summary, checkpoint
        if self.rank == 0:
            try:
                found[1] = self._open_run_dir(restore=False)
                if found[1] is None and (self.run_dir / CHECKPOINT).exists():
                    found[2] = load_checkpoint(self.run_dir / CHECKPOINT, map_location="cpu")
            except (ValueError, OSError) as err:
                found[0] = err
        dist.broadcast_object_list(found, src=0)
        error, finished, ckpt = found
        if error is not None:
            raise error
        if ckpt is not None:
            self._restore(ckpt)
            self.log(self._resume_message())
        return finished

    def _open_run_dir(self, restore: bool = True) -> dict[str, Any] | None:
        ckpt_path = self.run_dir / CHECKPOINT
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.resume:
                raise ValueError(
                    f"run directory {self.run_dir} exists; resume it with --resume, or choose "
                    "another run.name / run.out"
                )
            if (self.run_dir / SUMMARY).exists():
                saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
                if _comparable(saved) != _comparable(self.config.to_dict()):
                    raise ValueError(
                        f"the finished run in {self.run_dir} was made with another recipe; "
                        "choose another run.name / run.out for this one"
                    )
                return json.loads((self.run_dir / SUMMARY).read_text())
            if ckpt_path.exists():
                if restore:
                    self._restore(load_checkpoint(ckpt_path, map_location=self.device))
                    self.log(self._resume_message())
                return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        write_json(self.run_dir / "env.json", environment(self.device, self.world))
        write_json(self.run_dir / "split.json", self.data.split)
        return None

    # ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or to an interruption) and return the summary."""
        self.owns_group = False
        try:
            self._setup()
            self.state = self._fresh_state()
            finished = self._prepare_run_dir()
            if finished is not None:
                self.log(f"{self.run_dir} is finished already")
                return finished
            epochs = self.config.schedule.epochs
            self.display = RunDisplay(epochs, bars=self.progress, verbose=self.verbose)
            with _stop_on_signals() as flag:
                while self.state["epoch"] < epochs:
                    self._train_epoch(flag)
                    self._end_epoch()
                    if self._agree(flag["stop"]) and self.state["epoch"] < epochs:
                        raise Interrupted(self.run_dir)  # the epoch's checkpoint is saved
            summary = self._finish()
            if self.owns_group:
                dist.barrier()  # no process leaves while another still talks to it
            return summary
        finally:
            if self.owns_group:
                self._leave_group()

    def _leave_group(self) -> None:
        """Free the DDP wrapper while its process group lives, then shut the group down. (Were
        the wrapper freed last, the group's destructor would join gloo's threads holding the GIL
        that they may need: a deadlock seen at exit.)"""
        self.net = self.model
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.model = self.model
        gc.collect()
        dist.destroy_process_group()

    def _agree(self, stop: bool) -> bool:
        """Whether any process was asked to stop (all then stop at the same step)."""
        if self.world == 1:
            return stop
        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _sum_over_processes(self, *values: Tensor) -> list[Tensor]:
        if self.world == 1:
            return list(values)
        flat = torch.stack([v.double() for v in values])
        dist.all_reduce(flat)
        return list(flat.unbind())

    def _train_epoch(self, flag: dict[str, bool]) -> None:
        c, st = self.config, self.state
        epoch = st["epoch"]
        self.optimizer.set_epoch(epoch)
        self.loss_fn.set_epoch(epoch)
        rho = rho_at(c.optim, epoch, c.schedule.epochs)
        if rho is not None:
            for group in self.optimizer.param_groups:
                group["rho"] = rho
        steps = len(self.loader)
        if c.run.max_steps_per_epoch is not None:
            steps = min(steps, c.run.max_steps_per_epoch)
        self.model.train()
        self.display.start_epoch(epoch, steps, st["step"])
        start = time.perf_counter()
        loss_sum = torch.tensor(st["loss_sum"], dtype=torch.float64, device=self.device)
        correct = torch.tensor(st["correct"], dtype=torch.int64, device=self.device)
        counted = torch.tensor(st["counted"], dtype=torch.int64, device=self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        for x, y in self.loader:
            t = epoch + st["step"] / steps
            factor = lr_factor(c.schedule, t)
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = lr * factor
            closure, labels = self._closures(x, y)
            with autocast:
                out = self.optimizer.step(closure, labels)
            if self.scaler is not None:
                self.scaler.update()
            mine = labels if isinstance(labels, Tensor) else torch.cat(labels)
            st["step"] += 1
            st["global_step"] += 1
            st["seen"] += len(y)
            if self.optimizer.last_step_skipped:
                st["nonfinite"] += 1
                st["consecutive_nonfinite"] += 1
                if st["consecutive_nonfinite"] >= c.run.max_nonfinite:
                    raise TrainingError(
                        f"{st['consecutive_nonfinite']} non-finite steps in a row at epoch "
                        f"{epoch + 1}, step {st['step']}: the run stopped; the last good "
                        f"checkpoint in {self.run_dir} is kept. Lower optim.lr or the radius, "
                        "or check the data"
                    )
            else:
                st["consecutive_nonfinite"] = 0
                loss_sum += out.loss.double() * len(mine)
                correct += (out.logits.argmax(1) == mine).sum()
                counted += len(mine)
            self.display.advance()
            if self.on_step is not None:
                self.on_step(self, epoch, st["step"])
            if st["step"] >= steps:
                break
            if self._agree(flag["stop"]):
                st["train_time"] += time.perf_counter() - start
                self._keep_sums(loss_sum, correct, counted)
                self._checkpoint(self.run_dir / CHECKPOINT)
                self.display.end_epoch()
                raise Interrupted(self.run_dir)
        self.display.end_epoch()
        st["train_time"] += time.perf_counter() - start
        self._keep_sums(loss_sum, correct, counted)
        if self.loader.position != 0 and st["step"] >= steps:
            self.loader.set_epoch(epoch + 1)  # an epoch cut short by max_steps_per_epoch

    def _keep_sums(self, loss_sum: Tensor, correct: Tensor, counted: Tensor) -> None:
        """Store the epoch's running training sums, over all processes, in the state."""
        loss_sum, correct, counted = self._sum_over_processes(loss_sum, correct, counted)
        st = self.state
        st["loss_sum"], st["correct"], st["counted"] = float(loss_sum), int(correct), int(counted)

    def _end_epoch(self) -> None:
        c, st = self.config, self.state
        epoch = st["epoch"]
        counted = max(st["counted"], 1)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": st["loss_sum"] / counted,
            "train_acc": st["correct"] / counted, "lr": self.optimizer.param_groups[0]["lr"],
            "nonfinite_steps": st["nonfinite"], "train_time_s": st["train_time"],
        }
        last = epoch + 1 == c.schedule.epochs
        if self.rank == 0 and (last or (epoch + 1) % c.run.eval_every == 0):
            # Momentum-SAM's model holds perturbed weights between steps: evaluate and keep w
            at_w = getattr(self.optimizer, "at_w", contextlib.nullcontext)
            with at_w():
                record.update(self.evaluate())
                best = st["best"]
                if best is None or record["overall"] > best["overall"]:
                    st["best"] = {k: record[k] for k in ("epoch", "overall", "many", "medium", "few")}
                    self._checkpoint(self.run_dir / BEST, weights_only=True)
        st.update(epoch=epoch + 1, step=0, loss_sum=0.0, correct=0, counted=0)
        if self.rank == 0:
            _append_metrics(self.run_dir, record)
        self._checkpoint(self.run_dir / CHECKPOINT)
        line = f"epoch {epoch + 1}/{c.schedule.epochs}: train loss {record['train_loss']:.4f}"
        if "overall" in record:
            line += (f", test overall {record['overall']:.4f} (many {_fmt(record['many'])}, "
                     f"medium {_fmt(record['medium'])}, few {_fmt(record['few'])})")
        self.display.say(line + self.display.eta_text())

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Test-set metrics: overall (mean per-class accuracy), many/medium/few, per class, ECE."""
        was_training = self.model.training
        self.model.eval()
        logits, labels = [], []
        self.test_loader.set_epoch(0)
        for x, y in self.test_loader:
            logits.append(self.model(x).float())
            labels.append(y)
        self.model.train(was_training)
        z, y = torch.cat(logits), torch.cat(labels)
        per_class = per_class_accuracy(z, y, self.num_classes)
        groups = group_accuracy(per_class, self.data.groups)
        test_loss = float(torch.nn.functional.cross_entropy(z, y))
        return {**{k: _num(v) for k, v in groups.items()}, "test_loss": test_loss,
                "ece": _num(expected_calibration_error(z, y, bins=15)),
                "per_class": [_num(v) for v in per_class.tolist()]}

    def _finish(self) -> dict[str, Any]:
        if self.rank != 0:
            summary: list[Any] = [None]
            dist.broadcast_object_list(summary, src=0)
            return summary[0]
        metrics = read_metrics(self.run_dir)
        last = metrics[-1]
        st = self.state
        summary = {
            "method": self.config.optim.method,
            "label": self.config.run.label or self.config.optim.method,
            "seed": self.config.run.seed, "run": str(self.run_dir),
            "epochs": self.config.schedule.epochs,
            "last": {k: last.get(k) for k in ("epoch", "overall", "many", "medium", "few",
                                               "test_loss", "ece")},
            "best": st["best"], "per_class": last.get("per_class"),
            "classes": self.data.train.classes, "counts": self.data.counts,
            "groups": self.data.groups,
            "thresholds": {"many": self.data.thresholds[0], "few": self.data.thresholds[1]},
            "images_per_second": st["seen"] / st["train_time"] if st["train_time"] else None,
            "train_time_s": st["train_time"], "steps": st["global_step"],
            "forwards_per_step": st["forwards"] / max(st["global_step"], 1),
            "nonfinite_steps": st["nonfinite"],
            "peak_memory_mb": _peak_memory_mb(self.device), "processes": self.world,
            "note": "'last' is the final epoch; 'best' is the best test epoch (optimistic).",
        }
        write_json(self.run_dir / SUMMARY, summary)
        try:
            from samkit.report.plots import plot_run

            plot_run(self.run_dir)
        except Exception as err:  # a plot must never cost a finished run
            self.log(f"warning: plots not written ({err})")
        if self.world > 1:
            dist.broadcast_object_list([summary], src=0)
        return summary


def _comparable(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recipe without where its run lives (a run directory may be moved or renamed)."""
    if config is None:
        return None
    run = {k: v for k, v in config["run"].items() if k not in ("out", "name")}
    return {**config, "run": run}


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / METRICS).write_text(text)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
