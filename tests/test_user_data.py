"""A user's own data: plain class-per-folder trees as they come, and file-list benchmarks (ImageNet-LT
and friends) streamed from disk, from the readers and transforms to `samkit train`."""

from __future__ import annotations

import json
import os
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import write_file_list_set, write_image_tree
from PIL import Image

from samkit.cli import main
from samkit.data import (
    FileList,
    StreamingDataset,
    StreamingLoader,
    head_first,
    holdout,
    load_file_list,
    read_file_list,
)
from samkit.data.filelist import center_crop_box, random_resized_crop_box
from samkit.train.config import ConfigError, load_config
from samkit.train.data import make_loaders, prepare_data
from samkit.train.loop import Interrupted, Trainer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Decoded-image caches go to a temporary folder, never the user's."""
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


# ---- splits: head first, held out ------------------------------------------------------------


def test_head_first_orders_by_count_then_label() -> None:
    assert head_first([5, 40, 10, 40, 20]) == [1, 3, 4, 2, 0]
    assert head_first([3, 3, 3]) == [0, 1, 2]


def test_holdout_is_stratified_seeded_and_complete() -> None:
    labels = np.repeat([0, 1, 2, 3], [40, 20, 10, 1])
    kept, held = holdout(labels, 0.2, seed=3)
    assert np.bincount(labels[held], minlength=4).tolist() == [8, 4, 2, 0]  # a lone image stays
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(71))
    again_kept, again_held = holdout(torch.from_numpy(labels), 0.2, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, holdout(labels, 0.2, seed=4)[1])
    assert np.bincount(labels[holdout(labels, 0.01)[1]], minlength=4).tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        holdout(labels, 1.0)


# ---- plain class-per-folder trees -------------------------------------------------------------

# The folder of the issue: 40 / 20 / 10 / 5 images, class folders not in head-first name order.
PETS = {"cat": 5, "dog": 40, "eel": 10, "fox": 20}


def pets(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    write_image_tree(root, list(PETS.values()), list(PETS), size=28)
    return root


def test_plain_folder_trains_as_it_comes_head_first(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """No train/test folders: a stratified, seeded test split is held out; profile "none" is the
    default; classes are renumbered head first for split.json, groups, the summary and plots."""
    root = pets(tmp_path)
    recipe = ["data.name=image-folder", f"data.root={root}", "data.batch_size=8",
              "data.val_fraction=0.2", "data.many=20", "data.few=6", "data.augment=none",
              "schedule.epochs=4", "optim.method=sam", "optim.kwargs={rho: 0.05}", "optim.lr=0.02",
              f"run.out={tmp_path / 'runs'}", "run.name=pets", "run.threads=1"]
    assert main(["train", "--quiet", *recipe]) == 0
    run = tmp_path / "runs" / "pets"
    split = json.loads((run / "split.json").read_text())
    assert split["profile"] == "none"
    assert split["classes"] == ["dog", "fox", "eel", "cat"]
    assert split["class_ids"] == [1, 3, 2, 0]  # folder (name-order) label of each class
    # per class of n: round(0.2 n) test (>= 1), then round(0.25 of the rest) validation
    assert split["counts"] == [24, 12, 6, 3] and split["total"] == 45
    held = split["held_out"]
    assert (len(held["test"]), len(held["val"]), len(held["train"])) == (15, 15, 45)
    assert sorted(held["test"] + held["val"] + held["train"]) == list(range(75))
    assert split["groups"] == ["many", "medium", "medium", "few"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == split["classes"] and summary["counts"] == split["counts"]
    assert len(summary["per_class"]) == 4
    assert summary["last"]["overall"] > 0.5  # well above chance (0.25): a learnable stand-in
    assert (run / "plots" / "per_class.png").stat().st_size > 0
    # the same recipe holds out the same images: a second run directory gets the same split
    again = prepare_data(load_config(None, recipe))
    assert again.split["held_out"] == held and again.test.class_counts() == [8, 4, 2, 1]
    assert again.val is not None and again.val.class_counts() == [8, 4, 2, 1]


def test_a_profile_on_an_imbalanced_folder_names_real_keys(tmp_path: Path) -> None:
    root = pets(tmp_path)
    config = load_config(None, ["data.name=image-folder", f"data.root={root}",
                                "data.profile=exp", "data.ratio=100"])
    with pytest.raises(ConfigError, match=r"data\.n_max, data\.ratio; data\.profile=none"):
        prepare_data(config)
    ok = load_config(None, ["data.name=image-folder", f"data.root={root}", "data.profile=exp",
                            "data.ratio=4", "data.n_max=4"])
    assert prepare_data(ok).counts == [4, 2, 1, 1]  # exp keeps label order: class 0 the head


def test_folder_with_split_folders_keeps_them(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "set" / "train", [3, 9], ["a", "b"], size=8)
    write_image_tree(tmp_path / "set" / "test", [2, 2], ["a", "b"], size=8, seed=1)
    data = prepare_data(load_config(None, ["data.name=image-folder",
                                           f"data.root={tmp_path / 'set'}"]))
    assert data.train.classes == ["b", "a"] and data.counts == [9, 3]
    assert data.test.class_counts() == [2, 2] and "held_out" not in data.split


# ---- file lists: reader, transforms, streaming --------------------------------------------------


def test_read_file_list_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# comment\ntrain/a b/1.jpg 3\n\n/train/c/2.jpg 0\n")
    assert read_file_list(good) == (["train/a b/1.jpg", "/train/c/2.jpg"], [3, 0])
    files = load_file_list("good.txt", tmp_path)  # relative to the root
    assert files.paths == ("train/a b/1.jpg", "train/c/2.jpg")  # a leading "/" is relative
    assert files.classes == ["c", "1", "2", "a b"] and files.class_counts() == [1, 0, 0, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text("x/1.jpg 0\nx/2.jpg cat\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'relative/path label'"):
        read_file_list(bad)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="lists no image"):
        read_file_list(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_file_list(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="has label 3 but the data set has 2 classes"):
        load_file_list(good, tmp_path, num_classes=2)


def test_random_resized_crop_box_stays_in_bounds_and_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(300, 200, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.08 * 0.9 <= w * h / 60000 <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # a 10 x 1000 strip never fits the ratio: the fallback is the centered 10 x 13 box
    assert random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 506)
    assert center_crop_box(512, 256, 224, 256) == (144.0, 16.0, 368.0, 240.0)


def test_streaming_dataset_crops_and_seeds(tmp_path: Path) -> None:
    entries = write_image_tree(tmp_path / "img", [2, 1], size=20)
    files = FileList(tmp_path / "img", tuple(p for p, _ in entries),
                     torch.tensor([c for _, c in entries]), ["class0", "class1"])
    pixels = np.asarray(Image.open(tmp_path / "img" / entries[0][0]).convert("RGB"))
    x, label = StreamingDataset(files, 16, train=False, resize=20)[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and label == entries[0][1]
    assert torch.equal(x, torch.from_numpy(pixels[2:18, 2:18].copy()).permute(2, 0, 1))
    train = StreamingDataset(files, 8, train=True)
    assert torch.equal(train[(1, 5)][0], train[(1, 5)][0])
    assert not torch.equal(train[(1, 5)][0], train[(1, 6)][0])
    missing = FileList(tmp_path, ("nope.jpg",), torch.tensor([0]), ["a"], "file list l.txt")
    with pytest.raises(FileNotFoundError, match="nope.jpg .line 1 of file list l.txt. does not"):
        StreamingDataset(missing, 8)[0]


@pytest.mark.parametrize("limit", [100, 200])  # 400 pixels: PIL's error (> 2 x 100), its warning
def test_a_decompression_bomb_in_a_file_list_names_the_file_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    entries = write_image_tree(tmp_path / "img", [1], size=20)
    files = FileList(tmp_path / "img", tuple(p for p, _ in entries), torch.tensor([0]), ["a"],
                     "file list l.txt")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    pattern = (rf"^{re.escape(str(tmp_path / 'img' / entries[0][0]))} \(from file list l.txt\) declares more "
               r"pixels than PIL's decompression-bomb limit allows \(.*\); if the image is "
               r"genuine, raise PIL.Image.MAX_IMAGE_PIXELS .*, else remove the file$")
    for train in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stray warning either
            with pytest.raises(ValueError, match=pattern):
                StreamingDataset(files, 8, train=train)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the file itself is fine
    assert StreamingDataset(files, 8)[0][0].shape == (3, 8, 8)


def test_streaming_loader_workers_resume_and_slices(tmp_path: Path) -> None:
    write_file_list_set(tmp_path, [12, 6, 3], 1, size=12)
    files = load_file_list("train.txt", tmp_path)
    data = StreamingDataset(files, 8, train=True)

    def batches(loader: StreamingLoader, n: int | None = None) -> list:
        out = []
        for x, y in loader:
            out.append((x, y))
            if n is not None and len(out) == n:
                break
        return out

    serial = StreamingLoader(data, 4, seed=1)
    assert len(serial) == 6 and serial.num_samples == 21
    first = batches(serial)
    assert [len(y) for _, y in first] == [4, 4, 4, 4, 4, 1]
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(files.labels.tolist())
    parallel = StreamingLoader(data, 4, seed=1, workers=2)
    for (a, ya), (b, yb) in zip(first, batches(parallel), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)  # workers change nothing
    assert serial.epoch == 1 and not torch.equal(batches(serial)[0][0], first[0][0])
    stopped = StreamingLoader(data, 4, seed=1)
    batches(stopped, 2)
    resumed = StreamingLoader(data, 4, seed=1)
    resumed.load_state_dict(stopped.state_dict())
    rest = batches(resumed)
    assert len(rest) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, first[2:]))
    with pytest.raises(ValueError, match="saved with batch_size=4"):
        StreamingLoader(data, 5, seed=1).load_state_dict(stopped.state_dict())
    whole = batches(StreamingLoader(data, 4, seed=1, drop_last=True))
    for rank in range(2):
        part = batches(StreamingLoader(data, 4, seed=1, drop_last=True, rank=rank, world=2))
        assert all(torch.equal(p[0], w[0].chunk(2)[rank]) for p, w in zip(part, whole))


def test_file_list_miniature_trains_head_first(tmp_path: Path) -> None:
    """`samkit train` on a generated miniature of the ImageNet-LT format, streamed by a worker
    process: the lists define the long tail, head-first classes, standard thresholds."""
    counts = [6, 60, 3, 30, 12, 110]
    write_file_list_set(tmp_path / "mini", counts, 4, size=32)
    recipe = ["data.name=filelist", f"data.root={tmp_path / 'mini'}", "data.train_list=train.txt",
              "data.val_list=val.txt", "data.test_list=test.txt", "data.image_size=28",
              "data.workers=1", "data.batch_size=32", "data.eval_batch_size=32",
              "schedule.epochs=2", "optim.method=sam", "optim.kwargs={}",
              f"run.out={tmp_path / 'runs'}", "run.name=mini", "run.threads=1"]
    assert main(["train", "--quiet", *recipe]) == 0
    run = tmp_path / "runs" / "mini"
    split = json.loads((run / "split.json").read_text())
    assert split["counts"] == sorted(counts, reverse=True) and split["profile"] == "none"
    assert split["class_ids"] == [5, 1, 3, 4, 0, 2]
    assert split["classes"] == [f"class{i}" for i in split["class_ids"]]
    assert split["thresholds"] == {"many": 100, "few": 20}
    assert split["groups"] == ["many", "medium", "medium", "few", "few", "few"]
    assert split["mean"] == [0.485, 0.456, 0.406] and split["indices"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 * 7 and len(summary["per_class"]) == 6
    assert (run / "plots" / "per_class.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="data.profile must be none for filelist"):
        prepare_data(load_config(None, [*recipe, "data.profile=exp"]))
    with pytest.raises(ConfigError, match="needs data.test_list"):
        prepare_data(load_config(None, ["data.name=filelist", f"data.root={tmp_path}",
                                        "data.train_list=train.txt"]))
    with pytest.raises(ValueError, match="has no class folder with images"):  # no list: folders
        prepare_data(load_config(None, ["data.name=filelist", f"data.root={tmp_path}"]))


def test_sharpness_on_a_streamed_run_decodes_a_stratified_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`samkit sharpness` on a file-list run: the batch is up to --per-class images of every
    class, decoded through the evaluation transform and normalised as training normalises."""
    write_file_list_set(tmp_path / "mini", [5, 2, 1], 2, size=32)
    recipe = ["data.name=filelist", f"data.root={tmp_path / 'mini'}", "data.train_list=train.txt",
              "data.test_list=test.txt", "data.image_size=28", "data.workers=0",
              "data.batch_size=8", "schedule.epochs=1", "optim.method=sam", "optim.kwargs={}",
              f"run.out={tmp_path / 'runs'}", "run.name=mini", "run.threads=1"]
    monkeypatch.setattr(Trainer, "_plot", lambda self: None)  # the run's plots are not tested here
    Trainer(load_config(None, recipe), progress=False).run()
    run = tmp_path / "runs" / "mini"
    assert main(["sharpness", str(run), "--quiet", "--per-class", "3", "--hvps", "6",
                 "--what", "trace,groups"]) == 0
    result = json.loads((run / "sharpness" / "sharpness.json").read_text())
    assert result["counts"] == [5, 2, 1] and result["samples"] == 3 + 2 + 1
    assert result["trace"]["num_hvps"] == 6 and result["groups"]["names"] == ["few", "tail"]
    # the batch itself: the training list's first images of each class, centre-cropped
    from samkit.analysis.run import _analysis_batch

    config = load_config(run / "config.yaml")
    data = prepare_data(config)
    x, y = _analysis_batch(data, 3, torch.device("cpu"), 28)
    assert y.tolist() == [0, 0, 0, 1, 1, 2]
    first = data.train.root / data.train.paths[int(torch.nonzero(data.train.labels == 2)[0])]
    # the evaluation transform: resize the shorter side to round(28 / 0.875) = 32 (as it is),
    # centre crop 28
    pixels = np.asarray(Image.open(first).convert("RGB"))
    expected = torch.from_numpy(pixels[2:30, 2:30].copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    torch.testing.assert_close(x[5], (expected - mean) / std)


def test_presets_know_their_list_files_and_classes(tmp_path: Path) -> None:
    """data.name=imagenet-lt finds ImageNet_LT_{train,val,test}.txt under data.root, has 1000
    classes named by their folders, and refuses a list of another data set."""
    lines = [f"train/n{c:08d}/{i}.JPEG {c}" for c in range(1000) for i in range(1 + (c == 7) * 2)]
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(lines))
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/x/1.JPEG 0\nval/y/2.JPEG 999\n")
    data = prepare_data(load_config(None, ["data.name=imagenet-lt", f"data.root={tmp_path}"]))
    assert data.train.num_classes == 1000 and data.counts[:2] == [3, 1]
    assert data.train.classes[:2] == ["n00000007", "n00000000"]  # head first, folder names
    assert data.thresholds == (100, 20) and data.val is None
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join([*lines, "train/z/1.JPEG 1000"]))
    with pytest.raises(ValueError, match="has label 1000 but the data set has 1000 classes"):
        prepare_data(load_config(None, ["data.name=imagenet-lt", f"data.root={tmp_path}"]))


def test_streamed_run_resumes_exactly(tmp_path: Path) -> None:
    """Interrupted mid-epoch and resumed, a streamed run ends with the weights and metrics of one
    that never stopped: the loader's place and every image's crop are in the checkpoint's seeds."""
    write_file_list_set(tmp_path / "mini", [40, 20, 8], 2, size=32)

    def recipe(out: str) -> list[str]:
        return ["data.name=filelist", f"data.root={tmp_path / 'mini'}",
                "data.train_list=train.txt", "data.test_list=test.txt", "data.image_size=28",
                "data.workers=0", "data.batch_size=16", "schedule.epochs=2", "optim.method=sam",
                "optim.kwargs={}", f"run.out={tmp_path / out}", "run.name=r",
                "run.deterministic=true", "run.threads=1"]

    straight = Trainer(load_config(None, recipe("a")), progress=False)
    straight.run()

    def interrupt(trainer: Trainer, epoch: int, step: int) -> None:
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        Trainer(load_config(None, recipe("b")), progress=False, on_step=interrupt).run()
    resumed = Trainer(load_config(None, recipe("b")), resume=True, progress=False)
    resumed.run()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    lines = [[{k: v for k, v in json.loads(x).items() if not k.endswith("time_s")}
              for x in (tmp_path / out / "r" / "metrics.jsonl").read_text().splitlines()]
             for out in ("a", "b")]
    assert lines[0] == lines[1] and len(lines[0]) == 2


def test_photos_of_many_sizes_stream_from_class_folders(tmp_path: Path) -> None:
    """data.name=filelist with no list files: the class folders, images of any size, held out and
    renumbered head first like an in-memory folder."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name, n in {"ant": 3, "bee": 12, "cow": 6}.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            Image.new("RGB", size, (40 * i % 255, 90, 30)).save(root / name / f"{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    config = load_config(None, ["data.name=filelist", f"data.root={root}", "data.image_size=16",
                                "data.workers=0"])
    data = prepare_data(config)
    assert data.train.classes == ["bee", "cow", "ant"] and data.counts == [10, 5, 2]
    assert data.test.class_counts() == [2, 1, 1] and data.split["class_ids"] == [1, 2, 0]
    assert len(data.split["held_out"]["test"]) == 4
    loader, test_loader = make_loaders(config, data, torch.device("cpu"))
    shapes = {tuple(x.shape[1:]) for x, _ in loader} | {tuple(x.shape[1:]) for x, _ in test_loader}
    assert shapes == {(3, 16, 16)}
