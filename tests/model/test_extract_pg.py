"""Stage 04's extraction into a PostgreSQL store from 2 processes (gloo), each writing its own
share to the server: vectors equal a one-process run; an interrupted run resumes without a
duplicate row."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from test_extract import N_IMAGES, _free_port, _vectors, data, full_run  # noqa: F401 - fixtures

from common.store.maintenance import open_store
from common.store.postgres import PgFeatureStore, PgStore


def _pg_worker(rank: int, world: int, port: int, args: dict) -> None:
    import torch.distributed as dist

    from common.model.extract import extract_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    target = PgStore(args["url"], args["schema"])
    written: list[int] = []
    original = PgFeatureStore.write_vectors

    def spy(self, model_id, ids, vectors):  # what this process itself sends to the server
        if args["fail_rank"] == rank and len(written) == 1:
            raise RuntimeError("simulated loss of this node")
        n = original(self, model_id, ids, vectors)
        written.append(len(ids))
        return n

    PgFeatureStore.write_vectors = spy
    try:
        try:
            m = extract_features(args["ckpt"], args["splits"], target, args["cfg"], device="cpu",
                                 rank=rank, world_size=world, chunk_rows=4)
            outcome = {"metrics": m}
        except Exception as e:  # noqa: BLE001 - recorded for the test to check
            outcome = {"error": f"{type(e).__name__}: {e}"}
        outcome["rows_sent"] = sum(written)
        Path(f"{args['out']}.{rank}").write_text(json.dumps(outcome))
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        PgFeatureStore.write_vectors = original
        dist.destroy_process_group()
    # The outcome is written: leave without the interpreter's teardown, where a gloo thread still
    # being destroyed aborted the process now and then ("terminate called without an active
    # exception", SIGABRT) after the simulated failure.
    os._exit(0)


def _spawn(data, pg_store, tmp_path, fail_rank: int) -> list[dict]:  # noqa: F811
    import torch.multiprocessing as mp

    args = {"ckpt": str(data["a"]), "splits": str(data["splits"]), "cfg": data["cfg"],
            "url": pg_store.url, "schema": pg_store.schema, "out": str(tmp_path / "out.json"), "fail_rank": fail_rank}
    mp.spawn(_pg_worker, args=(2, _free_port(), args), nprocs=2, join=True)
    return [json.loads((tmp_path / f"out.json.{r}").read_text()) for r in range(2)]


def _pg_vectors(target: PgStore, model_id: int) -> dict[str, np.ndarray]:
    with open_store(target) as s:
        ids, _, X = s.load_matrix(None, model_id)
        path_of = {r.id: r.path for r in s.images()}
    return {path_of[int(i)]: X[k] for k, i in enumerate(ids)}


def test_two_ranks_write_their_own_shares_and_resume(data, full_run, pg_store, tmp_path):  # noqa: F811
    # rank 1 fails on its second chunk: every rank stops; what was committed stays
    first = _spawn(data, pg_store, tmp_path, fail_rank=1)
    assert all("error" in o for o in first), first
    assert "simulated loss" in first[1]["error"] and "rank 1" in first[0]["error"]
    with open_store(pg_store) as s:
        (model,) = s.models()
        kept = s.counts()["vectors"]
        assert not model.complete and 0 < kept < N_IMAGES
    # the rerun embeds only what is missing, each rank writing to the server itself
    again = _spawn(data, pg_store, tmp_path, fail_rank=-1)
    m = again[0]["metrics"]
    assert m["world_size"] == 2 and m["vectors"] == N_IMAGES and m["model_id"] == model.id
    assert m["vectors_written"] == N_IMAGES - kept == again[0]["rows_sent"] + again[1]["rows_sent"]
    assert again[0]["rows_sent"] > 0 and again[1]["rows_sent"] > 0  # nothing went through rank 0
    with open_store(pg_store) as s:
        assert s.counts()["vectors"] == N_IMAGES and s.model_info(model.id).complete
    full_store, full = full_run
    got, want = _pg_vectors(pg_store, m["model_id"]), _vectors(full_store, full["model_id"])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6)
