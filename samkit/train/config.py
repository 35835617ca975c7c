"""Training recipes: typed, validated configuration read from YAML with `key=value` overrides.

A recipe is a nested mapping (data, model, loss, optim, schedule, run); every key has a type and a
default, an unknown key or a value of the wrong type is an error that names the key, and the
resolved recipe is written into every run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with 1e-3 read as a float (plain YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig:
    # fashion-mnist, mnist, cifar10, cifar100, image-folder, mnist1d; streamed from list files:
    # filelist (train_list and test_list, or neither: the class folders under root), imagenet-lt,
    # places-lt, inat2018
    name: str = "fashion-mnist"
    root: str | None = None  # data location; else $SAMKIT_DATA and the standard places
    ratio: float = 100.0  # imbalance ratio n_max / n_min (1 = the balanced set)
    # exp, step, or none (keep every image); default: none for image-folder and list files
    # (data that come long-tailed), exp for the built-in balanced sets
    profile: str | None = None
    n_max: int | None = None  # images the head class keeps under exp / step (default: its count)
    order: str = "shuffle"  # which images a class keeps: shuffle (LDAM, Focal-SAM) or first
    subsample_seed: int = 0  # also seeds the held-out test / validation split of a plain folder
    test_fraction: float = 0.2  # held out per class as test from a folder with no train/test
    val_fraction: float = 0.0  # held out per class as validation from such a folder (or from
    # the training split of any in-memory set, before the long-tailed cut)
    val_per_class: int = 0  # a balanced validation set of this many images per class, drawn
    # (seeded by subsample_seed) from the training images the long-tailed cut leaves unused
    train_list: str | None = None  # list files of 'relative/path label' lines (data.name=filelist),
    val_list: str | None = None  # relative to data.root unless absolute
    test_list: str | None = None
    image_size: int = 224  # crop side of streamed images
    workers: int | None = None  # decoding processes of streamed images (default: min(8, CPUs))
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: str = "crop-flip"  # crop-flip, flip or none (streamed: random resized crop + flip)
    crop_padding: int = 4
    normalize: bool = True  # per-channel mean/std of the training set (ImageNet's when streamed)
    many: int | None = None  # many-shot: more than this many training images (default by C)
    few: int | None = None  # few-shot: fewer than this many (default by C)
    limit_per_class: int | None = None  # read only the first k images of each class (quick runs)
    # data.name=mnist1d only: arguments of the mnist1d package's generator (num_samples,
    # iid_noise_scale, seed, ...); the generated set is cached, keyed by them
    mnist1d: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "small-cnn"  # a samkit model, or your own as "package.module:factory"
    head: str = "linear"  # linear or normed (LDAM's cosine classifier)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model's builder


@dataclass
class LossConfig:
    name: str = "ce"  # ce, ldam, ldam-drw, la, balanced-softmax, vs
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    method: str = "focalsam"  # any name of samkit.optim.available()
    base: str = "sgd"  # sgd or adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    norm_stats: str = "update"  # update, freeze or authors (CR-SAM): statistics on perturbed passes
    kwargs: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters
    rho_schedule: list[list[float]] = field(default_factory=list)  # [[fraction, rho], ...]


@dataclass
class ScheduleConfig:
    epochs: int = 10
    lr: str = "cosine"  # cosine, step or constant
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)  # epochs of the step schedule
    decay: float = 0.1  # the step schedule's factor per milestone


@dataclass
class RunConfig:
    name: str = "run"
    out: str = "runs"
    label: str | None = None  # how reports group this run (default: the method's name)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    deterministic: bool = False
    threads: int | str | None = None  # torch CPU threads; None or "auto": torch's own default
    eval_every: int = 1
    eval_test: bool = True  # false: the test set is never loaded (tuning; needs a validation set)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    max_nonfinite: int = 20  # consecutive non-finite steps that stop the run
    amp: str = "none"  # none, bf16 (autocast) or fp16 (autocast and a GradScaler)
    accumulate: int = 1  # micro-batches per step, gradients accumulated (same step, less memory)
    compile: bool | str = False  # torch.compile the model: true (inductor) or a backend's name
    channels_last: bool = False  # channels-last memory format for images (faster convs on GPUs)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The recipe `samkit train` runs with no arguments: Fashion-MNIST-LT (ratio 100), the small CNN and
# Focal-SAM, a few minutes on 2 CPU cores.
DEFAULT_RECIPE: dict[str, Any] = {
    "data": {"name": "fashion-mnist", "ratio": 100, "augment": "crop-flip", "crop_padding": 2},
    "model": {"name": "small-cnn"},
    "loss": {"name": "ce"},
    "optim": {"method": "focalsam", "lr": 0.05, "weight_decay": 5e-4,
              "kwargs": {"rho": 0.1, "gamma": 2.0, "lam": 0.8}},
    "schedule": {"epochs": 8, "lr": "cosine"},
    "run": {"name": "fmnist-lt100-focalsam"},
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (int accepted for float), or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (
        tp is int and isinstance(value, bool)
    ):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the recipe'} must be a mapping; got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


class _Whole(dict):
    """A mapping given whole in an override (key={...}): it replaces, never merges."""


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a mapping")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (dotted keys, YAML values) as a nested mapping. A mapping given whole
    (optim.kwargs={rho: 0.1}) replaces the recipe's; dotted keys (optim.kwargs.rho=0.1) change
    one entry."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=0.1)")
        try:
            value = read_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot read {raw!r} as a value ({err})") from None
        _set(tree, key.strip(), _Whole(value) if isinstance(value, dict) else value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and not isinstance(value, _Whole) and isinstance(
            out.get(key), dict
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(dict(value) if isinstance(value, _Whole) else value)
    return out


def _read_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe file as a mapping, or a ConfigError naming the file and the fix."""
    if path.is_dir():
        hint = (f"; to continue the run in it use samkit train --resume {path}"
                if (path / "config.yaml").is_file() else "")
        raise ConfigError(f"recipe {path} is a directory; give the path of a YAML recipe{hint}")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; give the path of a YAML recipe")
    try:
        tree = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML ({' '.join(str(err).split())}); "
                          "fix the file") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} is a YAML {type(tree).__name__}, not a mapping of "
                          "sections (data, model, loss, optim, schedule, run)")
    return tree


def _switch_method(tree: dict[str, Any], extra: dict[str, Any]) -> None:
    """When an override changes optim.method (or loss.name), the recipe's kwargs of the old
    method are dropped, since they do not fit another one (dotted optim.kwargs.* overrides then
    fill an empty mapping); a run name ending in the old method's name is renamed after the new
    one, so `samkit train optim.method=sam` does not collide with the default run."""
    for section, key in (("optim", "method"), ("loss", "name")):
        new = extra.get(section, {}).get(key) if isinstance(extra.get(section), dict) else None
        old_section = tree.get(section)
        if new is None or not isinstance(old_section, dict):
            continue
        old = old_section.get(key, getattr(Config(), section).__dict__[key])
        if new == old:
            continue
        if not isinstance(extra[section].get("kwargs"), _Whole):
            old_section.pop("kwargs", None)
        run = tree.get("run")
        name = run.get("name") if isinstance(run, dict) else None
        wanted = extra.get("run", {}).get("name") if isinstance(extra.get("run"), dict) else None
        if (section == "optim" and wanted is None and isinstance(name, str)
                and isinstance(old, str) and name.endswith(f"-{old}")):
            run["name"] = f"{name[: -len(old)]}{new}"


def load_config(recipe: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> Config:
    """The validated config of a recipe (a YAML path, a mapping, or None for the default recipe)
    with `key=value` overrides applied on top."""
    extra = parse_overrides(overrides or [])
    if recipe is None:
        tree = copy.deepcopy(DEFAULT_RECIPE)
    elif isinstance(recipe, dict):
        tree = copy.deepcopy(recipe)
    else:
        tree = _read_recipe(Path(recipe))
    if not isinstance(tree, dict):
        raise ConfigError(f"the recipe must be a mapping of sections; got {tree!r}")
    _switch_method(tree, extra)
    tree = _merge(tree, extra)
    config = _build(Config, tree, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check values that the types alone do not pin down."""
    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {rule}; got {value!r}")

    d, s, o, r = config.data, config.schedule, config.optim, config.run
    need(d.ratio >= 1, "data.ratio", d.ratio, ">= 1")
    need(d.profile in (None, "exp", "step", "none"), "data.profile", d.profile,
         "exp, step or none")
    need(d.n_max is None or d.n_max >= 1, "data.n_max", d.n_max, "None or >= 1")
    need(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "in (0, 1)")
    need(0 <= d.val_fraction < 1 - d.test_fraction, "data.val_fraction", d.val_fraction,
         f">= 0 and < 1 - data.test_fraction ({1 - d.test_fraction:g})")
    need(d.val_per_class >= 0, "data.val_per_class", d.val_per_class, ">= 0")
    if d.val_per_class and d.val_fraction:
        raise ConfigError("data.val_per_class and data.val_fraction both ask for a validation "
                          "set; set one of them to 0")
    if d.mnist1d and d.name.lower().replace("-", "") != "mnist1d":
        raise ConfigError(f"data.mnist1d sets the generator of data.name=mnist1d, but data.name "
                          f"is {d.name!r}; remove data.mnist1d or set data.name=mnist1d")
    need(d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
    need(d.workers is None or d.workers >= 0, "data.workers", d.workers, "None or >= 0")
    need(d.order in ("shuffle", "first"), "data.order", d.order, "shuffle or first")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, ">= 1")
    need(d.augment in ("crop-flip", "flip", "none"), "data.augment", d.augment,
         "crop-flip, flip or none")
    need(d.subsample_seed >= 0, "data.subsample_seed", d.subsample_seed, ">= 0")
    need(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, ">= 0")
    need(o.base in ("sgd", "adamw"), "optim.base", o.base, "sgd or adamw")
    need(o.lr >= 0, "optim.lr", o.lr, ">= 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    need(o.norm_stats in ("update", "freeze", "authors"), "optim.norm_stats", o.norm_stats,
         "update, freeze, or authors (CR-SAM only)")
    for i, item in enumerate(o.rho_schedule):
        need(len(item) == 2 and 0 <= item[0] <= 1 and item[1] >= 0, f"optim.rho_schedule[{i}]",
             item, "[fraction in [0, 1], rho >= 0]")
    if o.rho_schedule:
        from samkit.optim import get

        try:
            keys = get(o.method).radius_keys
        except ValueError:
            keys = ("rho",)  # an unknown method is refused where the optimizer is built
        if "rho" not in keys:
            has = f"its radii are {', '.join(keys)}" if keys else "it has no radius"
            raise ConfigError(
                f"optim.rho_schedule sets each param group's 'rho', which {o.method} does not "
                f"read ({has}): drop optim.rho_schedule, or set the radii in optim.kwargs")
    need(s.epochs >= 1, "schedule.epochs", s.epochs, ">= 1")
    if config.loss.name.lower() == "ldam-drw":
        from samkit.losses import LDAM_DRW_EPOCH

        drw = config.loss.kwargs.get("drw_epoch", LDAM_DRW_EPOCH)
        if isinstance(drw, int) and drw >= s.epochs:
            raise ConfigError(
                f"loss ldam-drw re-weights from epoch {drw} (counted from 0) but schedule.epochs "
                f"is {s.epochs}, so it never would: set loss.kwargs.drw_epoch below {s.epochs} "
                f"(the LDAM-DRW protocol re-weights the last fifth: {int(0.8 * s.epochs)})")
    need(s.lr in ("cosine", "step", "constant"), "schedule.lr", s.lr, "cosine, step or constant")
    need(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, ">= 0")
    need(0 < s.decay <= 1, "schedule.decay", s.decay, "in (0, 1]")
    need(_plain_name(r.name), "run.name", r.name,
         "a plain name (no '/', '\\' or leading '.'): the run directory is run.out/run.name")
    need(r.eval_every >= 1, "run.eval_every", r.eval_every, ">= 1")
    need(r.max_nonfinite >= 1, "run.max_nonfinite", r.max_nonfinite, ">= 1")
    need(r.max_steps_per_epoch is None or r.max_steps_per_epoch >= 1, "run.max_steps_per_epoch",
         r.max_steps_per_epoch, "None or >= 1")
    need(r.threads in (None, "auto") or (isinstance(r.threads, int) and r.threads >= 1),
         "run.threads", r.threads, "null, auto or >= 1")
    need(r.amp in ("none", "bf16", "fp16"), "run.amp", r.amp, "none, bf16 or fp16")
    need(1 <= r.accumulate <= d.batch_size, "run.accumulate", r.accumulate,
         f">= 1 and <= data.batch_size ({d.batch_size})")


def _plain_name(name: str) -> bool:
    """Whether `name` is one path component that stays inside its folder."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") \
        and "\0" not in name


# What `--resume` may change. Run settings and the schedule's length never change what was trained
# so far; the learning rate and radius (and their schedules) may be lowered to get past a failure
# (a non-finite stop). Every other key defines the run: changing it means a new run.
RESUMABLE = ("run.out", "run.name", "run.label", "run.device", "run.threads", "run.deterministic",
             "run.max_nonfinite", "run.eval_every", "run.compile", "run.channels_last",
             "schedule.epochs")
AFTER_FAILURE = ("optim.lr", "optim.rho_schedule", "optim.kwargs.rho", "schedule.lr",
                 "schedule.warmup_epochs", "schedule.milestones", "schedule.decay")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as {dotted key: value} (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty mapping adds no key
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict[str, Any], config: Config, *,
                   after_failure: bool = False) -> list[dict[str, Any]]:
    """The keys in which `config` differs from the `saved` recipe of a run, as
    [{"key", "old", "new"}], if resuming may change them (see RESUMABLE, AFTER_FAILURE);
    otherwise a ConfigError that lists every key that differs."""
    old, new = flatten(saved), flatten(config.to_dict())
    # a key the saved recipe lacks (written before the key existed) had its default value
    defaults = flatten(Config().to_dict())
    old.update({k: defaults[k] for k in new.keys() - old.keys() if k in defaults})
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    allowed = RESUMABLE + (AFTER_FAILURE if after_failure else ())
    refused = [k for k in diffs if k not in allowed]
    if refused:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        hint = (" (the learning rate and radius may change only after the run stopped on a "
                "failure)" if all(k in AFTER_FAILURE for k in refused) else "")
        raise ConfigError(
            f"made with another recipe: {shown}{hint}; resume with the run's own recipe "
            "(samkit train --resume RUN_DIR), or choose another run.name for a new run"
        )
    return [{"key": k, "old": old.get(k), "new": new.get(k)} for k in diffs
            if k not in ("run.out", "run.name")]
