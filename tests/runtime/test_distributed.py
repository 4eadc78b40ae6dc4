"""Two CPU processes (gloo) train exactly as one process on the same global batch.

Each rank runs ``common.train.Trainer.step`` (DDP, features gathered with gradients, SupCon on the
global batch) on its half of a global batch; one process runs the same step on the whole batch.
The loss and the updated weights (SGD, lr 1: they carry the gradient) must agree to 1e-5, which
checks the gradient scale across the gather and DDP's averaging (see ``common/distributed.py``).
A tiny float64 model without batch norm keeps the comparison exact.
"""
from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.config.load import load_config
from common.config.schema import Config
from common.model.network import SupConModel
from common.runtime.distributed import (
    agree,
    agreed,
    barrier,
    gather_nograd,
    gather_strided,
    gather_with_grad,
    go_no_go,
    is_distributed,
    rank_world,
)
from common.training.trainer import Trainer

WORLD = 2
B_GLOBAL = 8  # images per global batch (4 per rank), two views each
METHODS = ("supcon", "simclr")


class _Backbone(torch.nn.Module):
    """A stand-in for a timm backbone: pooled features of ``num_features`` dimensions."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6), torch.nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _model() -> SupConModel:
    torch.manual_seed(0)
    return SupConModel(_Backbone(), head="mlp", feat_dim=4).double()


def _cfg(method: str) -> Config:
    return load_config(None, [f"train.method={method}", "train.momentum=0.9", "train.weight_decay=0.0001",
                                "train.temperature=0.5", "train.base_temperature=0.5", "model.channels_last=false"])


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B_GLOBAL, 2, 3, 4, 4, generator=g, dtype=torch.float64)  # (B, views, C, H, W)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    return x, y, torch.arange(B_GLOBAL)


def _step(method: str, rank: int, world: int) -> dict:
    x, y, idx = _batch()
    b = B_GLOBAL // world
    sl = slice(rank * b, (rank + 1) * b)
    trainer = Trainer(_model(), _cfg(method), torch.device("cpu"), rank=rank, world_size=world)
    loss = trainer.step(x[sl], y[sl], idx[sl], lr=1.0)
    return {"loss": loss, "weights": {k: v.detach().clone() for k, v in trainer.raw.state_dict().items()}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {m: _step(m, rank, world) for m in METHODS}
        # rows sharded rank::world come back whole and in order
        res["strided"] = gather_strided(torch.arange(7.0)[rank::world].view(-1, 1), 7).flatten()
        res["rank_world"] = rank_world()
        # a strided (transposed) incoming gradient reaches each rank's rows intact, summed over ranks
        t = (torch.arange(6.0).view(2, 3) + 10 * rank).requires_grad_()
        w = torch.arange(3.0 * 2 * world).view(3, 2 * world)
        (gather_with_grad(t).T * w).sum().backward()
        res["strided_grad"] = t.grad
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    # fork: the children inherit the imported modules (spawn would import torch twice more)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method=method)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process_on_the_global_batch(two_ranks, method):
    one = _step(method, 0, 1)
    start = _model().state_dict()
    for r, res in enumerate(two_ranks):
        got = res[method]
        assert got["loss"] == pytest.approx(one["loss"], abs=1e-5), r
        for k, v in one["weights"].items():
            assert not torch.equal(v, start[k]), k  # the step moved every weight
            assert torch.allclose(got["weights"][k], v, atol=1e-5, rtol=0), (r, k)


def test_gather_helpers(two_ranks):
    for r, res in enumerate(two_ranks):
        assert res["rank_world"] == (r, WORLD)
        assert res["strided"].tolist() == list(range(7))
        w = torch.arange(3.0 * 2 * WORLD).view(3, 2 * WORLD)
        assert torch.equal(res["strided_grad"], WORLD * w.T[2 * r:2 * r + 2])
    assert rank_world() == (0, 1) and not is_distributed()  # this process: no group
    x = torch.ones(2, 3)
    assert gather_with_grad(x) is x and gather_nograd(x) is x


# ----------------------------------------------------------------------------- go / no-go


def _run_pair(target, *args, timeout: float = 180.0) -> None:
    """Two forked ranks of ``target(rank, *args)``; fails when a rank is still running after ``timeout``
    (a rank blocked in a collective waits for the backend's timeout: 30 minutes for gloo)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"rank(s) {alive} still blocked after {timeout} s"


def _agree_worker(rank: int, port: int, out: str) -> None:
    from common.errors import UserError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    res: dict = {}
    try:
        with go_no_go():  # every rank fine: nothing raised
            pass
        try:
            with go_no_go():
                if rank == 1:
                    raise UserError("cannot read /data/x/bad.png")
            barrier()  # rank 0 would wait here forever without the go/no-go
            res["check"] = "passed"
        except UserError as e:
            res["check"] = str(e)

        def loader():  # rank 1's third batch holds an unreadable image
            for i in range(5):
                if rank == 1 and i == 2:
                    raise UserError("cannot read /data/y/torn.jpg")
                yield i

        seen = []
        try:
            for i in agreed(loader()):
                seen.append(i)
                barrier()  # the step's collectives
        except UserError as e:
            res["loader"] = (seen, str(e))
        try:
            with go_no_go():
                if rank == 0:
                    raise ValueError("disk full")
        except Exception as e:  # noqa: BLE001 - the kind is what is checked
            res["other"] = (type(e).__name__, str(e))
    finally:
        dist.destroy_process_group()
    Path(out, f"agree{rank}.json").write_text(__import__("json").dumps(res))


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    import json

    _run_pair(_agree_worker, _free_port(), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"agree{r}.json").read_text()) for r in range(WORLD))
    assert r1["check"] == "cannot read /data/x/bad.png"
    assert r0["check"] == "rank 1 stopped: cannot read /data/x/bad.png"
    assert r0["loader"] == [[0, 1], "rank 1 stopped: cannot read /data/y/torn.jpg"]
    assert r1["loader"] == [[0, 1], "cannot read /data/y/torn.jpg"]
    assert r0["other"] == ["ValueError", "disk full"]
    assert r1["other"] == ["PeerFailed", "rank 0 failed: ValueError: disk full"]


def _stage_worker(rank: int, port: int, run_dir: str, scenario: str) -> None:
    from common.errors import UserError
    from common.pipeline import runner
    from common.pipeline.runner import execute
    from common.pipeline.spec import StageSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    def main(ctx):
        if scenario == "main" and ctx.rank == 1:
            raise UserError("cannot read /data/x/bad.png")
        ctx.output("data.txt").write_text("x")
        return {}

    if scenario == "lock" and rank == 0:  # rank 0 alone checks the lock: another process holds it
        def held(*a, **k):
            raise UserError("01_random_split_dataset is running (pid 4242 on host): wait for it")
        runner._checks = held
    spec = StageSpec("01_random_split_dataset", types.SimpleNamespace(main=main), keys=("model.backbone",))
    code = execute(spec, ["--run", run_dir, "run.device=cpu"], table={spec.name: spec})
    Path(run_dir, f"code{rank}").write_text(str(code))


@pytest.mark.parametrize("scenario", ["main", "lock"])
def test_a_stage_refused_or_failing_on_one_rank_ends_both(tmp_path, scenario):
    _run_pair(_stage_worker, _free_port(), str(tmp_path), scenario)
    assert [(tmp_path / f"code{r}").read_text() for r in range(WORLD)] == ["2", "2"]
    sdir = tmp_path / "01_random_split_dataset"
    assert not (sdir / "manifest.json").exists()
    if scenario == "main":  # rank 0 says why, naming the rank
        assert "ERROR   01_random_split_dataset: rank 1 stopped: cannot read /data/x/bad.png" in (sdir / "log.txt").read_text()
    else:  # refused before anything is written
        assert not (sdir / "log.txt").exists()


def test_go_no_go_in_one_process_changes_nothing():
    agree(None)
    with pytest.raises(ValueError, match="mine"):
        with go_no_go():
            raise ValueError("mine")
    assert list(agreed(iter([1, 2, 3]))) == [1, 2, 3]
