"""The data a run trains on, from the recipe's ``data`` section, and the loaders that feed it.

Three kinds of data:

- The built-in balanced sets (Fashion-MNIST, MNIST, CIFAR, MNIST-1D) are re-cut to a long-tailed
  profile (``data.profile`` exp or step, class 0 the head) and held in memory.
- A user's image folder (``data.name=image-folder``) is taken as it comes: profile "none" keeps
  every image. A plain class-per-folder tree with no ``train/`` and ``test/`` folders gets a
  stratified, seeded test split (``data.test_fraction``) and, when asked, a validation split
  (``data.val_fraction``), recorded in split.json.
- Validation: ``data.val_per_class=N`` draws a balanced validation set, N images of each class,
  from the training images that the long-tailed cut leaves unused (seeded by
  ``data.subsample_seed``, disjoint from the training subset by construction); where nothing is
  left over (``data.profile=none``), ``data.val_fraction`` holds a stratified fraction of the
  training split out instead. Either is recorded in split.json (``val``: indices into the
  loaded training split) and evaluated by the trainer each evaluated epoch.
- ``run.eval_test=false`` never loads the test set (a tuning run selects on validation only).
- List files of ``relative/path label`` lines (``data.name=filelist`` or a preset: imagenet-lt,
  places-lt, inat2018) are streamed from disk by :class:`samkit.data.StreamingLoader`; the lists
  define the long tail, and the groups use the standard thresholds (many > 100, few < 20).
  ``data.name=filelist`` with no list streams the class folders under ``data.root`` (photos of
  any size), with held-out splits as for an image folder.

Data kept as they come have their classes renumbered by training count, head first, so that
groups, tables and plots read from head to tail; split.json keeps each class's name and its
original label (``class_ids``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samkit.data import (
    FILE_LIST_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ArrayDataset,
    BatchLoader,
    FileList,
    StreamingDataset,
    StreamingLoader,
    channel_stats,
    crop_flip,
    default_thresholds,
    head_first,
    hflip_where,
    holdout,
    load_dataset,
    load_file_list,
    long_tail_counts,
    long_tail_indices,
    scan_class_folders,
    shot_groups,
)
from samkit.train.config import Config, ConfigError, DataConfig

Dataset = ArrayDataset | FileList


@dataclass
class Data:
    train: Dataset
    test: Dataset | None  # None when run.eval_test is false: the test set is never loaded
    counts: list[int]
    groups: list[str]
    thresholds: tuple[int, int]
    mean: list[float] | None
    std: list[float] | None
    split: dict[str, Any]
    val: Dataset | None = None
    in_channels: int = 3


def resolved_profile(d: DataConfig) -> str:
    """data.profile, or its default: "none" for data that come long-tailed (a user's image
    folder, list files), "exp" for the built-in balanced sets."""
    if d.profile is not None:
        return d.profile
    return "none" if d.name in ("image-folder", "imagefolder", *FILE_LIST_NAMES) else "exp"


def prepare_data(config: Config, progress: bool = True) -> Data:
    """Load the data set, build the training split (long-tailed or as it comes) and the class
    groups, and describe it all for split.json."""
    d = config.data
    profile = resolved_profile(d)
    split: dict[str, Any] = {}
    if d.val_per_class and (profile == "none" or d.name in FILE_LIST_NAMES):
        fix = "data.val_list" if d.name in FILE_LIST_NAMES else "data.val_fraction"
        raise ConfigError(f"data.val_per_class draws validation images from those the long-tailed "
                          f"cut leaves unused, and data.profile=none leaves none; use {fix}")
    if d.name in FILE_LIST_NAMES:
        if profile != "none":
            raise ConfigError(f"data.profile must be none for {d.name} (its list files define the "
                              f"long tail); got {profile!r}")
        train, val, test = _file_lists(d, split, config.run.eval_test)
    else:
        train, val, test = _in_memory(d, progress, split, config.run.eval_test)
        if d.val_fraction > 0 and val is None:
            train, val = _val_fraction(d, train, split)
    if profile == "none":
        order = head_first(train.class_counts())
        split["class_ids"] = order
        if order != sorted(order):
            note = "classes renumbered by training count, head first"
            train = _relabel(train, order, note)
            test = None if test is None else _relabel(test, order, note)
            val = None if val is None else _relabel(val, order, note)
        counts = train.class_counts()
        indices = None if isinstance(train, FileList) else list(range(len(train)))
    else:
        n_max = d.n_max if d.n_max is not None else max(train.class_counts())
        try:
            counts = long_tail_counts(n_max, train.num_classes, d.ratio, profile)
            indices = long_tail_indices(train.labels, counts, seed=d.subsample_seed, order=d.order)
        except ValueError as err:
            raise ConfigError(f"{err} (in the recipe: data.n_max, data.ratio; data.profile=none "
                              "keeps every image as it is)") from None
        if d.val_per_class:
            val = _val_per_class(d, train, indices, split)
        train = train.subset(indices, f"long-tailed {profile} ratio {d.ratio:g}, n_max {n_max}, "
                             f"order {d.order}, seed {d.subsample_seed}")
    many, few = (100, 20) if d.name in FILE_LIST_NAMES else default_thresholds(train.num_classes)
    many = d.many if d.many is not None else many
    few = d.few if d.few is not None else few
    groups = shot_groups(counts, many=many, few=few)
    mean = std = None
    if d.normalize and isinstance(train, FileList):
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif d.normalize and train.images.dtype == torch.uint8:
        mean, std = channel_stats(train.images)
    split.update({
        "source": train.source, "test_source": None if test is None else test.source,
        "classes": train.classes,
        "counts": counts, "total": int(sum(counts)), "profile": profile, "ratio": d.ratio,
        "order": d.order, "seed": d.subsample_seed, "thresholds": {"many": many, "few": few},
        "groups": groups, "mean": mean, "std": std,
        "indices": None if indices is None else [int(i) for i in indices]})
    if val is not None:
        split["val_source"] = val.source
    in_channels = 3 if isinstance(train, FileList) else int(train.images.shape[1])
    return Data(train, test, counts, groups, (many, few), mean, std, split, val, in_channels)


def _relabel(ds: Dataset, order: list[int], note: str) -> Dataset:
    """``ds`` with class ``order[k]`` renamed to class k."""
    if isinstance(ds, FileList):
        return ds.relabel(order, note)
    rank = torch.empty(len(order), dtype=torch.int64)
    rank[torch.tensor(order)] = torch.arange(len(order))
    return ArrayDataset(ds.images, rank[ds.labels], [ds.classes[o] for o in order],
                        f"{ds.source}; {note}")


def _val_per_class(d: DataConfig, train: ArrayDataset, indices: Any,
                   split: dict[str, Any]) -> ArrayDataset:
    """A balanced validation set: data.val_per_class images of each class, drawn at random
    (NumPy generator seeded by data.subsample_seed + 1) from the training images that the
    long-tailed ``indices`` leave out, so it can never overlap the training subset."""
    n = d.val_per_class
    labels = train.labels.cpu().numpy()
    unused = np.setdiff1d(np.arange(len(labels)), np.asarray(indices))
    rng = np.random.default_rng(d.subsample_seed + 1)
    chosen = []
    for c in range(train.num_classes):
        pool = unused[labels[unused] == c]
        if pool.size < n:
            raise ConfigError(f"data.val_per_class={n}, but the long-tailed cut leaves only "
                              f"{pool.size} unused images of class {c} ({train.classes[c]}); "
                              f"lower data.val_per_class to at most {pool.size}")
        chosen.append(np.sort(rng.permutation(pool)[:n]))
    picked = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    split["val"] = {"per_class": n, "seed": d.subsample_seed + 1,
                    "drawn_from": "training images unused by the long-tailed cut",
                    "indices": [int(i) for i in picked]}
    return train.subset(picked, f"validation: {n} per class unused by the long-tailed cut, "
                                f"seed {d.subsample_seed + 1}")


def _val_fraction(d: DataConfig, train: ArrayDataset,
                  split: dict[str, Any]) -> tuple[ArrayDataset, ArrayDataset]:
    """(training part, validation part): data.val_fraction of each class of the loaded training
    split held out (stratified, seeded by data.subsample_seed + 1) before any long-tailed cut."""
    kept, held = holdout(train.labels, d.val_fraction, d.subsample_seed + 1)
    note = f"{d.val_fraction:g} per class, seed {d.subsample_seed + 1}"
    split["val"] = {"fraction": d.val_fraction, "seed": d.subsample_seed + 1,
                    "drawn_from": "the loaded training split, before any long-tailed cut "
                                  "('indices' then count the rest)",
                    "indices": held.tolist()}
    return (train.subset(kept, f"training part: {note} held out"),
            train.subset(held, f"validation: {note}"))


def _in_memory(d: DataConfig, progress: bool, split: dict[str, Any], eval_test: bool = True,
               ) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset | None]:
    """(train, validation or None, test or None: not loaded unless ``eval_test``) of a named
    set or an image folder, in memory."""
    common: dict[str, Any] = {"root": d.root, "progress": progress,
                              "limit_per_class": d.limit_per_class}
    if d.mnist1d:
        common["mnist1d_args"] = dict(d.mnist1d)
    if d.name in ("image-folder", "imagefolder") and d.root is not None:
        try:
            train = load_dataset(d.name, split="train", **common)
        except ValueError as layout_error:
            if (Path(d.root).expanduser() / "train").is_dir():
                raise  # a split layout with a problem of its own
            try:
                everything = load_dataset(d.name, split="", **common)
            except ValueError:
                raise layout_error from None
            train, val, test = _held_out(d, everything, split)
            return train, val, test if eval_test else None
    else:
        train = load_dataset(d.name, split="train", **common)
    return train, None, load_dataset(d.name, split="test", **common) if eval_test else None


def _held_out(d: DataConfig, everything: Dataset,
              split: dict[str, Any]) -> tuple[Dataset, Dataset | None, Dataset]:
    """Stratified, seeded test (and validation) splits of a folder with no split folders."""
    kept, test_idx = holdout(everything.labels, d.test_fraction, d.subsample_seed)
    note = f"held out {d.test_fraction:g} per class, seed {d.subsample_seed}"
    record: dict[str, Any] = {"test_fraction": d.test_fraction, "val_fraction": d.val_fraction,
                              "seed": d.subsample_seed, "test": test_idx.tolist()}
    val = None
    if d.val_fraction > 0:
        rest, val_pos = holdout(everything.labels[kept], d.val_fraction / (1 - d.test_fraction),
                                d.subsample_seed + 1)
        record["val"] = kept[val_pos].tolist()
        val = everything.subset(kept[val_pos], f"validation: {note}")
        kept = kept[rest]
    record["train"] = kept.tolist()
    split["held_out"] = record  # indices into the folder (classes in name order, files sorted)
    return (everything.subset(kept, f"training part: {note}"), val,
            everything.subset(test_idx, f"test part: {note}"))


def _file_lists(d: DataConfig, split: dict[str, Any], eval_test: bool = True,
                ) -> tuple[FileList, FileList | None, FileList | None]:
    """(train, validation or None, test or None: not read unless ``eval_test``) lists of a
    file-list set or preset; with no list files, of the class folders under data.root
    (streamed: images of any size)."""
    if d.root is None:
        raise ConfigError(f"data.name={d.name} needs data.root: the folder the list files' image "
                          "paths are relative to")
    if d.name == "filelist" and d.train_list is None and d.test_list is None:
        train, val, test = _held_out(d, scan_class_folders(d.root), split)
        return train, val, test if eval_test else None
    preset = PRESETS.get(d.name)
    lists = {"train": d.train_list, "val": d.val_list, "test": d.test_list}
    if preset is not None:
        defaults = {"train": preset.train_list, "val": preset.val_list, "test": preset.test_list}
        lists = {k: v if v is not None else defaults[k] for k, v in lists.items()}
        if d.val_list is None and not (Path(d.root).expanduser() / preset.val_list).is_file():
            lists["val"] = None  # the validation list is optional
    for key in ("train", "test"):
        if lists[key] is None:
            raise ConfigError(f"data.name=filelist needs data.{key}_list: a text file of "
                              "'relative/path label' lines (or neither list, to stream the class "
                              "folders under data.root)")
    num_classes = preset.num_classes if preset is not None else None
    train = load_file_list(lists["train"], d.root, num_classes=num_classes)
    if d.limit_per_class is not None:
        keep = [i for c in range(train.num_classes)
                for i in (train.labels == c).nonzero().flatten()[:d.limit_per_class].tolist()]
        train = train.subset(sorted(keep), f"first {d.limit_per_class} per class")
    if min(train.class_counts()) == 0:
        empty = train.class_counts().index(0)
        raise ValueError(f"{train.source} has no image of class {empty} ({train.classes[empty]}); "
                         "every class needs training images")
    test = load_file_list(lists["test"], d.root, classes=train.classes) if eval_test else None
    val = (load_file_list(lists["val"], d.root, classes=train.classes)
           if lists["val"] is not None else None)
    return train, val, test


def make_loaders(config: Config, data: Data, device: torch.device, rank: int = 0,
                 world: int = 1) -> tuple[BatchLoader | StreamingLoader,
                                          BatchLoader | StreamingLoader | None]:
    """(training loader, test loader or None when the test set was not loaded). Every process
    draws the same global batches (drop_last keeps them divisible); a streaming loader decodes
    only this process's slice of each."""
    c, d = config, config.data
    train = data.train
    test_loader = None if data.test is None else eval_loader(config, data, data.test, device)
    if isinstance(train, FileList):
        workers = d.workers if d.workers is not None else min(8, os.cpu_count() or 1)
        loader = StreamingLoader(
            StreamingDataset(train, d.image_size, train=d.augment != "none"), d.batch_size,
            shuffle=True, seed=c.run.seed, drop_last=world > 1, device=device, mean=data.mean,
            std=data.std, workers=workers, rank=rank, world=world)
        return loader, test_loader
    augment = None
    if d.augment != "none" and train.images.dim() == 4:
        size = tuple(train.images.shape[-2:])
        augment = crop_flip(size, d.crop_padding) if d.augment == "crop-flip" else _flip_only
    loader = BatchLoader(train.images, train.labels, d.batch_size, shuffle=True, seed=c.run.seed,
                         device=device, augment=augment, mean=data.mean, std=data.std,
                         drop_last=world > 1)
    return loader, test_loader


def eval_loader(config: Config, data: Data, ds: Dataset,
                device: torch.device) -> BatchLoader | StreamingLoader:
    """An evaluation loader (no shuffling, no augmentation, the training normalisation) over
    ``ds``: the test or the validation set."""
    d = config.data
    if isinstance(ds, FileList):
        workers = d.workers if d.workers is not None else min(8, os.cpu_count() or 1)
        return StreamingLoader(StreamingDataset(ds, d.image_size, train=False), d.eval_batch_size,
                               shuffle=False, device=device, mean=data.mean, std=data.std,
                               workers=workers)
    return BatchLoader(ds.images, ds.labels, d.eval_batch_size, shuffle=False, device=device,
                       mean=data.mean, std=data.std)


def _flip_only(batch: Tensor, generator: torch.Generator) -> Tensor:
    coin = torch.rand(batch.shape[0], generator=generator) < 0.5
    return hflip_where(batch, coin.to(batch.device))
