"""Two processes on the gloo backend against one process: the synchronised ascent equals one process
on the concatenated batch, and the per-process ascent (m-sharpness) equals its reference computed by
hand, for every method, with the model wrapped in DistributedDataParallel."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_helpers import BASES, SUBSET_METHODS, assert_same_model, batches, make_model
from test_optim_reference import METHODS, build, reference_optimizer
from torch.nn.parallel import DistributedDataParallel

import samkit.optim as so

WORLD, STEPS, BATCH = 2, 3, 24


def shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    size = x.shape[0] // WORLD
    return x[rank * size : (rank + 1) * size]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = train_all(rank)
        if rank == 0:
            torch.save(results, out)
    finally:
        gc.collect()  # DDP wrappers go before their process group
        dist.destroy_process_group()


def train_all(rank: int) -> dict:
    results = {}
    for method in METHODS:
        for sync in (True, False):
            model = make_model("mlp")
            ddp = DistributedDataParallel(model)
            opt = build(method, model, "sgd", model=ddp, ascent_sync=sync)
            for t, (x, y) in enumerate(batches("mlp", STEPS, batch=BATCH)):
                opt.set_epoch(t)
                xr = shard(x, rank)
                opt.step(lambda xr=xr, ddp=ddp: ddp(xr), shard(y, rank))
            results[method, sync] = model.state_dict()
    # K-SAM with a closure that forwards only the selected samples: each process its share of the
    # global top k
    model = make_model("mlp")
    ddp = DistributedDataParallel(model)
    opt = build("ksam", model, "sgd", model=ddp)
    for x, y in batches("mlp", STEPS, batch=BATCH):
        xr = shard(x, rank)
        opt.step(lambda index=None, xr=xr: ddp(xr if index is None else xr[index]), shard(y, rank))
    results["ksam-index"] = model.state_dict()
    # ... and a process holding none of them still joins the averages (with zero gradients)
    model = make_model("mlp")
    ddp = DistributedDataParallel(model)
    opt = build("ksam", model, "sgd", model=ddp, k=2)
    for x, y in lopsided_batches():
        xr = shard(x, rank)
        opt.step(lambda index=None, xr=xr: ddp(xr if index is None else xr[index]), shard(y, rank))
    results["ksam-empty"] = model.state_dict()
    # the ascent on a sub-batch: each process draws its own (per-process ascent)
    for method, (name, kwargs, _) in SUBSET_METHODS.items():
        model = make_model("mlp")
        ddp = DistributedDataParallel(model)
        base, base_kwargs = BASES["sgd"]
        opt = so.create(
            name,
            model.parameters(),
            base=base,
            model=ddp,
            ascent_sync=False,
            **kwargs,
            **base_kwargs,
        )
        for x, y in batches("mlp", STEPS, batch=BATCH):
            xr = shard(x, rank)
            step = lambda index=None, xr=xr, net=ddp: net(xr if index is None else xr[index])  # noqa: E731
            opt.step(step, shard(y, rank))
        results[method, "subset"] = model.state_dict()
    try:  # without model=, a distributed step is refused
        so.SAM(make_model("mlp").parameters(), lr=0.1).step(lambda: None, shard(y, rank))
    except ValueError as err:
        results["error"] = str(err)
    return results


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    """Every method, both ascent options, trained by two processes (rank 0's weights)."""
    out = tmp_path_factory.mktemp("ddp") / "weights.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


class Capture:
    """Stands in for the base optimizer in a reference step: keeps the final gradient instead of
    stepping."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.param_groups = opt.param_groups
        self.grads: list[torch.Tensor] = []

    def step(self) -> None:
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_synchronised_ascent_equals_one_process_on_the_whole_batch(distributed, method) -> None:
    twin = make_model("mlp")
    opt = reference_optimizer(method, twin, "sgd")
    for t, (x, y) in enumerate(batches("mlp", STEPS, batch=BATCH)):
        METHODS[method][2](twin, opt, x, y, t)
    got = make_model("mlp")
    got.load_state_dict(distributed[method, True])
    assert_same_model(got, twin)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_per_process_ascent_equals_its_reference(distributed, method) -> None:
    """Each process takes its method's step gradient on its own shard (its own ascent); the base
    steps once with their average."""
    got = make_model("mlp")
    got.load_state_dict(distributed[method, False])
    sync = make_model("mlp")
    sync.load_state_dict(distributed[method, True])
    if method == "msam":  # no ascent pass: nothing for the option to change
        assert_same_model(got, sync, atol=0, rtol=0)
        return
    twin = make_model("mlp")
    opt = reference_optimizer(method, twin, "sgd")
    captures = [Capture(opt) for _ in range(WORLD)]  # each process keeps its own method state
    for t, (x, y) in enumerate(batches("mlp", STEPS, batch=BATCH)):
        per_rank = []
        for rank, capture in enumerate(captures):
            METHODS[method][2](twin, capture, shard(x, rank), shard(y, rank), t)
            per_rank.append(capture.grads)
        ref.finish(opt, [sum(gs) / WORLD for gs in zip(*per_rank)])
    assert_same_model(got, twin)
    if method != "plain":  # the two options differ: the test can tell them apart
        assert not torch.allclose(sync.head.weight, got.head.weight, atol=1e-8)


@pytest.mark.parametrize("method", sorted(SUBSET_METHODS))
def test_per_process_subset_ascent_equals_its_reference(distributed, method) -> None:
    """The ascent on a sub-batch drawn by each process from its own shard: each process its
    method's step gradient (its own draws and stored direction); the base steps with the average."""
    got = make_model("mlp")
    got.load_state_dict(distributed[method, "subset"])
    twin = make_model("mlp")
    base, base_kwargs = BASES["sgd"]
    opt = base([{"params": list(twin.parameters()), "rho": 0.1}], **base_kwargs)
    captures = [Capture(opt) for _ in range(WORLD)]
    for t, (x, y) in enumerate(batches("mlp", STEPS, batch=BATCH)):
        per_rank = []
        for rank, capture in enumerate(captures):
            SUBSET_METHODS[method][2](twin, capture, shard(x, rank), shard(y, rank), t)
            per_rank.append(capture.grads)
        ref.finish(opt, [sum(gs) / WORLD for gs in zip(*per_rank)])
    assert_same_model(got, twin)


def lopsided_batches() -> list:
    """Batches whose high losses all sit in the first process's shard (inputs x 20 there, 0 in
    the second: every second-shard sample has the same moderate loss)."""
    out = []
    for x, y in batches("mlp", STEPS, batch=BATCH):
        x = x.clone()
        x[: BATCH // WORLD] *= 20
        x[BATCH // WORLD :] = 0
        out.append((x, y))
    return out


@pytest.mark.parametrize("case,k", [("ksam-index", BATCH // 4), ("ksam-empty", 2)])
def test_ksam_index_closures_take_the_global_top_k(distributed, case: str, k: int) -> None:
    twin = make_model("mlp")
    opt = reference_optimizer("ksam", twin, "sgd")
    data = lopsided_batches() if case == "ksam-empty" else batches("mlp", STEPS, batch=BATCH)
    for x, y in data:
        if case == "ksam-empty":
            losses = ref.ce(twin(x), y)
            assert set(torch.topk(losses, k).indices.tolist()) < set(range(BATCH // WORLD))
        ref.ksam(twin, opt, x, y, k=k, subset=True)
    got = make_model("mlp")
    got.load_state_dict(distributed[case])
    assert_same_model(got, twin)


def test_a_distributed_step_without_the_model_is_refused(distributed) -> None:
    assert "needs model=" in distributed["error"]
