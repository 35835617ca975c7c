"""The training loop: a long-tailed data set, a model, a loss and any samkit method, as a run.

A run directory holds the resolved recipe (config.yaml), the environment (env.json), how the
long-tailed split was made (split.json), metrics per epoch (metrics.jsonl), the final summary
(summary.json), checkpoints written atomically (checkpoint.pt: the last one; best.pt: the weights of
the best epoch) and plots (plots/*.png). A run stopped by SIGINT/SIGTERM saves where it stands and
resumes exactly; repeated non-finite steps, or a model whose weights, normalisation statistics or
test logits are no longer finite, stop it without touching the last good checkpoint (stopped.json
says why; a resume may then lower the learning rate or radius, and changes.jsonl records each
change). A lock (.lock, released by the kernel when the process dies) keeps a second process out
of a run directory; a run directory made by a call that fails before its first checkpoint is
removed again, so the same command can simply be retried.

Under torchrun (WORLD_SIZE > 1) every process builds the same split and the same global batches;
each trains on its slice of every batch (data.batch_size is the global batch), the optimizer
averages gradients over processes, and rank 0 alone evaluates, logs and writes the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import inspect
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
from samkit.train.checkpoint import (
    atomic_write,
    json_text,
    load_checkpoint,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
    save_checkpoint,
    write_json,
)
from samkit.train.config import Config, ConfigError, resume_changes
from samkit.train.data import (  # noqa: F401 (Data: a public name)
    Data,
    eval_loader,
    make_loaders,
    prepare_data,
)
from samkit.train.metrics import expected_calibration_error, group_accuracy, per_class_accuracy
from samkit.train.progress import RunDisplay, is_terminal, say
from samkit.train.records import read_metrics
from samkit.train.schedules import lr_factor, rho_at

CHECKPOINT, BEST, SUMMARY, METRICS = "checkpoint.pt", "best.pt", "summary.json", "metrics.jsonl"
LOCK, STOPPED, CHANGES = ".lock", "stopped.json", "changes.jsonl"
# the files a run writes; a run directory that a failed first call made holds only these
RUN_FILES = ("config.yaml", "env.json", "split.json", METRICS, BEST, STOPPED, CHANGES, LOCK)
CHECKPOINT_KEYS = ("model", "optimizer", "loader", "progress", "rng")
GROUP_KEYS = ("overall", "many", "medium", "few")
# what summary.json keeps of the best and the last epoch (val_*: the validation set's)
BEST_KEYS = ("epoch", *GROUP_KEYS, *(f"val_{k}" for k in GROUP_KEYS))


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
    """A model of samkit's by name, the user's own as "package.module:factory" (called with
    whichever of num_classes, in_channels and head it accepts, found as import_user_module finds
    it), or "hf:<folder or hub name>" (a CLIP vision tower or ViT with a LoRA adapter);
    model.kwargs go to the builder."""
    name, kwargs = config.model.name, dict(config.model.kwargs)
    if name.startswith("hf:"):  # a pretrained vision transformer with a LoRA adapter
        if config.data.normalize:
            raise ValueError(f"model.name={name} normalises images with the backbone's own mean "
                             "and std: set data.normalize=false")
        from samkit.integrations.peft import build_adapted_vit
        return build_adapted_vit(name[3:], num_classes, in_channels, config.model.head, **kwargs)
    if ":" not in name:
        return build_model(name, num_classes=num_classes, in_channels=in_channels,
                           head=config.model.head, **kwargs)
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
    model = factory(**{k: v for k, v in offered.items() if k in wanted}, **kwargs)
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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"run.device={name} is not a device; use auto, cpu, cuda or cuda:N, "
                         "mps") from None
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
    flag = {"stop": False, "saving": False}
    if not _is_main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        # a second SIGINT stops at once, except while a checkpoint is written
        if flag["stop"] and signum == signal.SIGINT and not flag["saving"]:
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
        self.signals = {"stop": False, "saving": False}
        self._lock_fd: int | None = None
        self._own_dir = False  # this call may remove the run directory if it fails early
        self._saved_epoch: int | None = None  # the epoch count of the checkpoint on disk

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
        train = self.data.train
        self._check_model_fits(
            train.images[:2] if hasattr(train, "images")  # streamed images: their crop's shape
            else torch.zeros(2, in_channels, c.data.image_size, c.data.image_size))
        self.memory_format = torch.channels_last if c.run.channels_last else torch.preserve_format
        if c.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        try:
            self.loss_fn = build_loss(c.loss.name, class_counts=self.data.counts,
                                      **c.loss.kwargs).to(self.device)
        except TypeError as err:
            raise ValueError(f"loss.kwargs does not fit loss {c.loss.name} ({err}); see "
                             "samkit.losses.build_loss for its options") from None
        # what the steps call: the model, wrapped for several processes, compiled
        self.net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        wrapped = self.net if self.world > 1 else None  # the optimizer runs it under no_sync()
        if c.run.compile:
            backend = "inductor" if c.run.compile is True else c.run.compile
            known = [b for b in torch._dynamo.list_backends(exclude_tags=())
                     if "TESTING" not in b and "minifier" not in b]
            if backend not in known:
                raise ValueError(f"run.compile={backend} is not a torch.compile backend; use true "
                                 f"(inductor) or one of {', '.join(known)}")
            # a pass with several terms (ImbSAM, Focal-SAM, ...) backpropagates a retained graph,
            # which a compiled backward with donated buffers refuses (seen after an earlier
            # compile in the same process, as in a compare)
            torch._functorch.config.donated_buffer = False
            self.net = torch.compile(self.net, backend=backend)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.run.amp)
        self.scaler = (torch.amp.GradScaler(self.device.type) if c.run.amp == "fp16" else None)
        self.optimizer = make_optimizer(
            c, self.model, self.data.counts, self.loss_fn,
            wrapped=wrapped, grad_scaler=self.scaler)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.loader, self.test_loader = make_loaders(c, self.data, self.device, self.rank,
                                                     self.world)
        self.val_loader = (None if self.data.val is None
                           else eval_loader(c, self.data, self.data.val, self.device))
        if self.test_loader is None and self.val_loader is None:
            raise ValueError("run.eval_test=false needs a validation set to evaluate: set "
                             "data.val_per_class=N (built-in sets) or data.val_fraction")

    def _pairing(self) -> dict[str, str]:
        """Digests of what a paired comparison needs runs of one seed to share: the split
        (training and validation indices), the initial weights, and the batch order (the
        loader's seed, batch size and augmentation over that split). Taken before the first
        step and kept in the checkpoint, so a resumed run reports its true start."""
        import hashlib

        def digest(*parts: Any) -> str:
            h = hashlib.sha256()
            for part in parts:
                h.update(json_text(part, indent=None).encode() if not isinstance(part, bytes)
                         else part)
            return h.hexdigest()[:16]

        split = digest(self.data.split.get("indices"), self.data.split.get("val"),
                       self.data.split.get("held_out"), self.data.counts)
        weights = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        d = self.config.data
        return {"split": split, "init": weights.hexdigest()[:16],
                "batches": digest(split, self.config.run.seed, d.batch_size, d.augment,
                                  d.crop_padding, self.world)}

    def _check_model_fits(self, images: Tensor) -> None:
        """One forward in eval mode (no statistic changes) on two training images, so a model
        that does not fit the data's shape fails here with a clear message, not in step one."""
        name = self.config.model.name
        x = images.to(self.device).float()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(x)
        except RuntimeError as err:
            raise ValueError(
                f"model.name={name} does not fit the data ({tuple(images.shape[1:])} images): "
                f"{str(err).splitlines()[0]}; choose a model made for this input size"
            ) from None
        finally:
            self.model.train(was_training)
        if not isinstance(out, Tensor) or tuple(out.shape) != (len(x), self.num_classes):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model.name={name} returns {got} for {len(x)} images; it must "
                             f"return logits of shape (batch, {self.num_classes})")

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
        self.signals["saving"] = True
        try:
            save_checkpoint(path, state)
        finally:
            self.signals["saving"] = False
        if not weights_only:
            self._saved_epoch = self.state["epoch"]

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint (the recipe was checked against config.yaml already)."""
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
        self._saved_epoch = self.state["epoch"]
        if self.rank == 0:
            self._trim_metrics()

    def _trim_metrics(self) -> None:
        """Keep the metrics of the epochs the checkpoint holds (none without one): a kill between
        an epoch's log line and its checkpoint would otherwise log that epoch twice. Records of
        samkit 0.1.0 (numbered from 0) are rewritten numbered from 1."""
        done = self._saved_epoch or 0
        path = self.run_dir / METRICS
        raw = read_jsonl(path)
        lines = read_metrics(self.run_dir)
        kept = [m for m in lines if m.get("epoch", done) <= done]
        if kept != raw:
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
                    found[2] = load_checkpoint(self.run_dir / CHECKPOINT, map_location="cpu",
                                               keys=CHECKPOINT_KEYS)
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

    def _lock(self) -> None:
        """Hold an exclusive lock on the run directory (made if needed) for this call. The
        kernel drops it when the process ends, however it ends, so a dead run never blocks."""
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._own_dir = True
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"run directory {self.run_dir} is in use by another samkit process (pid "
                f"{holder}); wait for it to finish, or choose another run.name / run.out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the lock
            self._lock_fd = None

    def _discard(self) -> None:
        """After a failure before any checkpoint: remove what this run directory holds (only
        the run's own files), so the same command can be retried."""
        if self.rank != 0 or not self._own_dir or (self.run_dir / CHECKPOINT).exists():
            return
        remove_stale_temporaries(self.run_dir)
        for name in RUN_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()  # only if nothing else is left

    def _open_run_dir(self, restore: bool = True) -> dict[str, Any] | None:
        self._lock()
        ckpt_path = self.run_dir / CHECKPOINT
        remove_stale_temporaries(self.run_dir)  # left by a kill during a write
        if any(p.name != LOCK for p in self.run_dir.iterdir()):
            if not self.resume:
                raise ValueError(
                    f"run directory {self.run_dir} exists; resume it with --resume, or choose "
                    "another run.name / run.out"
                )
            finished = self._check_resume()
            self._own_dir = True
            if finished is not None:
                return finished
            if ckpt_path.exists():
                if restore:
                    self._restore(load_checkpoint(ckpt_path, map_location=self.device,
                                                  keys=CHECKPOINT_KEYS))
                    self.log(self._resume_message())
                return None
            # no checkpoint yet: the run starts from scratch in its own directory
            (self.run_dir / BEST).unlink(missing_ok=True)
            self._trim_metrics()
            self._write_run_files()  # a kill may have come before they were all written
            return None
        self._own_dir = True
        self._write_run_files()
        self._write_recipe()  # last: a directory with config.yaml holds the other files
        return None

    def _write_run_files(self) -> None:
        write_json(self.run_dir / "env.json", environment(self.device, self.world))
        write_json(self.run_dir / "split.json", self.data.split)

    def _write_recipe(self) -> None:
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        atomic_write(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))

    def _check_resume(self) -> dict[str, Any] | None:
        """Check this recipe against the run's (config.yaml); record the changes a resume may
        make (changes.jsonl), refuse the others. Return the summary of a finished run."""
        saved_path = self.run_dir / "config.yaml"
        if not saved_path.is_file():
            raise ValueError(f"{self.run_dir} is not a samkit run directory (no config.yaml); "
                             "choose another run.name / run.out")
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{saved_path} is damaged ({err}); start a new run") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{saved_path} is damaged (not a mapping); start a new run")
        stopped = self.run_dir / STOPPED
        failure = read_json(stopped) if stopped.exists() else None
        summary_path = self.run_dir / SUMMARY
        try:
            changes = resume_changes(saved, self.config, after_failure=failure is not None)
        except ConfigError as err:
            what = "finished run" if summary_path.exists() else "run"
            raise ConfigError(f"the {what} in {self.run_dir} was {err}") from None
        if summary_path.exists():
            summary = read_json(summary_path)
            done, epochs = summary.get("epochs"), self.config.schedule.epochs
            if isinstance(done, int) and epochs < done:
                raise ValueError(f"the finished run in {self.run_dir} has {done} epochs; "
                                 f"schedule.epochs={epochs} cannot undo them")
            if not isinstance(done, int) or epochs == done:
                return summary  # finished: run settings that changed do not matter
            summary_path.unlink()  # more epochs: go on from the last checkpoint
        if changes:
            self.log("resuming with changes: " + ", ".join(
                f"{c['key']} {c['old']!r} -> {c['new']!r}" for c in changes))
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes,
                     "after": failure}
            with open(self.run_dir / CHANGES, "a") as f:
                f.write(json_text(entry, indent=None) + "\n")
            self._write_recipe()
        stopped.unlink(missing_ok=True)
        return None

    # ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or to an interruption) and return the summary."""
        self.owns_group = False
        try:
            self._setup()
            self.state = self._fresh_state()
            self.state["pairing"] = self._pairing()
            finished = self._prepare_run_dir()
            if finished is not None:
                self.log(f"{self.run_dir} is finished already")
                if self.rank == 0 and not (self.run_dir / "plots" / "curves.png").exists():
                    self._plot()  # a kill came between the summary and the plots
                return finished
            epochs = self.config.schedule.epochs
            self.display = RunDisplay(epochs, bars=self.progress, verbose=self.verbose)
            with _stop_on_signals() as flag:
                self.signals = flag
                while self.state["epoch"] < epochs:
                    self._train_epoch(flag)
                    self._end_epoch()
                    if self._agree(flag["stop"]) and self.state["epoch"] < epochs:
                        raise Interrupted(self.run_dir)  # the epoch's checkpoint is saved
            summary = self._finish()
            if self.owns_group:
                dist.barrier()  # no process leaves while another still talks to it
            return summary
        except TrainingError as err:
            if self.rank == 0 and self._lock_fd is not None:
                write_json(self.run_dir / STOPPED, {"epoch": self.state.get("epoch"),
                                                    "reason": str(err)})
            self._discard()
            raise
        except BaseException:
            self._discard()
            raise
        finally:
            self._unlock()
            if self.owns_group:
                self._leave_group()

    def _leave_group(self) -> None:
        """Free the DDP wrapper while its process group lives, then shut the group down. (Were
        the wrapper freed last, the group's destructor would join gloo's threads holding the GIL
        that they may need: a deadlock seen at exit.)"""
        if hasattr(self, "model"):  # setup may have failed before the model was made
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
        # normalisation running statistics (and their batch counts): restored after a step that
        # is skipped or that leaves them non-finite (the forward passes fold a bad batch into
        # them either way)
        stats = list(self.model.buffers())
        for x, y in self.loader:
            before = [b.clone() for b in stats]
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
            skipped = self.optimizer.last_step_skipped or not _all_finite(stats)
            if skipped:
                with torch.no_grad():
                    for b, old in zip(stats, before, strict=True):
                        b.copy_(old)
                st["nonfinite"] += 1
                st["consecutive_nonfinite"] += 1
                if st["consecutive_nonfinite"] >= c.run.max_nonfinite:
                    raise self._failure(f"{st['consecutive_nonfinite']} non-finite steps in a "
                                        f"row at epoch {epoch + 1}, step {st['step']}")
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
        if not _all_finite([*self.model.parameters(), *self.model.buffers()]):
            raise self._failure(f"the model's weights or normalisation statistics are not "
                                f"finite after epoch {epoch + 1}")
        evaluated = self.rank == 0 and (last or (epoch + 1) % c.run.eval_every == 0)
        # Momentum-SAM's model holds perturbed weights between steps: evaluate and keep w
        with getattr(self.optimizer, "at_w", contextlib.nullcontext)():
            if evaluated:
                record.update(self.evaluate())
            bad = evaluated and any(k in record and record[k] is None
                                    for k in ("test_loss", "val_loss"))
            if self._agree(bad):  # every process stops
                raise self._failure(f"the evaluation after epoch {epoch + 1} is not finite")
            if evaluated:
                # the best epoch: on validation when there is a validation set, else on test
                key = "val_overall" if self.val_loader is not None else "overall"
                best, value = st["best"], record.get(key)
                if value is not None and (best is None or best.get(key) is None
                                          or value > best[key]):
                    st["best"] = {k: record.get(k) for k in BEST_KEYS}
                    st["best"]["chosen_on"] = ("validation" if key == "val_overall"
                                               else "test (optimistic)")
                    self._checkpoint(self.run_dir / BEST, weights_only=True)
        st.update(epoch=epoch + 1, step=0, loss_sum=0.0, correct=0, counted=0)
        if self.rank == 0:
            _append_metrics(self.run_dir, record)
        self._checkpoint(self.run_dir / CHECKPOINT)
        line = f"epoch {epoch + 1}/{c.schedule.epochs}: train loss {record['train_loss']:.4f}"
        for name, p in (("validation", "val_"), ("test", "")):
            if f"{p}overall" in record:
                line += (f", {name} overall {record[p + 'overall']:.4f} (many "
                         f"{_fmt(record[p + 'many'])}, medium {_fmt(record[p + 'medium'])}, "
                         f"few {_fmt(record[p + 'few'])})")
        self.display.say(line + self.display.eta_text())

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Metrics of the test set (overall: mean per-class accuracy; many/medium/few, per
        class, loss, ECE) unless run.eval_test is false, and of the validation set if there is
        one (val_overall, val_many, val_medium, val_few, val_loss; groups as for the test set,
        by training count)."""
        out: dict[str, Any] = {}
        if self.val_loader is not None:
            z, y, _, groups = self._evaluate_on(self.val_loader)
            out.update({f"val_{k}": _num(v) for k, v in groups.items()})
            out["val_loss"] = _loss(z, y)
        if self.test_loader is not None:
            z, y, per_class, groups = self._evaluate_on(self.test_loader)
            out.update({**{k: _num(v) for k, v in groups.items()}, "test_loss": _loss(z, y),
                        "ece": _num(expected_calibration_error(z, y, bins=15)),
                        "per_class": [_num(v) for v in per_class.tolist()]})
        return out

    def _evaluate_on(self, loader: Any) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """Logits (eval mode), labels, per-class and group accuracy over one pass of ``loader``."""
        was_training = self.model.training
        self.model.eval()
        logits, labels = [], []
        loader.set_epoch(0)
        for x, y in loader:
            logits.append(self.model(x).float())
            labels.append(y)
        self.model.train(was_training)
        z, y = torch.cat(logits), torch.cat(labels)
        per_class = per_class_accuracy(z, y, self.num_classes)
        return z, y, per_class, group_accuracy(per_class, self.data.groups)

    def _plot(self) -> None:
        try:
            from samkit.report.plots import plot_run

            plot_run(self.run_dir)
        except Exception as err:  # a plot must never cost a finished run
            self.log(f"warning: plots not written ({err})")

    def _failure(self, what: str) -> TrainingError:
        """The error that stops a run going non-finite, with advice that can be followed."""
        lr = self.config.optim.lr
        if self._saved_epoch is not None and (self.run_dir / CHECKPOINT).exists():
            kept = (f"the last good checkpoint (after epoch {self._saved_epoch}) in "
                    f"{self.run_dir} is kept; continue from it with a lower learning rate or "
                    f"radius, e.g. samkit train --resume {self.run_dir} optim.lr={lr / 10:g}")
        else:
            kept = ("no checkpoint had been written, so there is nothing to keep; run again "
                    f"with a lower learning rate or radius (e.g. optim.lr={lr / 10:g}), or "
                    "check the data")
        return TrainingError(f"{what}: the run stopped; {kept}")

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
            "last": {k: last.get(k) for k in (*BEST_KEYS, "test_loss", "ece", "val_loss")},
            "best": st["best"], "per_class": last.get("per_class"),
            "test_read": self.test_loader is not None, "pairing": st.get("pairing"),
            "classes": self.data.train.classes, "counts": self.data.counts,
            "groups": self.data.groups,
            "thresholds": {"many": self.data.thresholds[0], "few": self.data.thresholds[1]},
            "images_per_second": st["seen"] / st["train_time"] if st["train_time"] else None,
            "train_time_s": st["train_time"], "steps": st["global_step"],
            "forwards_per_step": st["forwards"] / max(st["global_step"], 1),
            "nonfinite_steps": st["nonfinite"],
            "peak_memory_mb": _peak_memory_mb(self.device), "processes": self.world,
            "note": ("'last' is the final epoch; 'best' is the epoch of the best validation "
                     "overall accuracy (its test numbers unbiased by the choice)"
                     if self.val_loader is not None else
                     "'last' is the final epoch; 'best' is the best test epoch (optimistic)."),
        }
        write_json(self.run_dir / SUMMARY, summary)
        self._plot()
        if self.world > 1:
            dist.broadcast_object_list([summary], src=0)
        return summary




def _loss(z: Tensor, y: Tensor) -> float | None:
    """Mean cross-entropy of logits ``z``; None (JSON null: the loop stops on it) if it or any
    logit is not finite."""
    loss = float(torch.nn.functional.cross_entropy(z, y))
    return loss if math.isfinite(loss) and bool(torch.isfinite(z).all()) else None


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every floating-point tensor holds finite values only (one synchronisation)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json_text(r, indent=None) + "\n" for r in records)
    atomic_write(run_dir / METRICS, lambda f: f.write(text.encode()))


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json_text(record, indent=None) + "\n")
