"""One command for a machine with a GPU: does the pipeline run there, and how fast? (under 8 minutes)

CPU half (always; the whole check with ``--cpu-only`` or without CUDA, exit 0 when it passes):

1. stages 01-02 of the demo (the digits, ``configs/demo.yaml``) in a temporary run folder;
2. stage 03 under ``torchrun --nproc_per_node=2`` with ``run.device=cpu`` (gloo, also on a machine
   whose GPUs are visible), one epoch of two steps; the manifest must record two processes;
3. SE-ResNeXt-50 (timm ``seresnext50_32x4d``, random weights, no download) at 224 px embedded on
   the CPU in float32: the reference vectors of step 7, and images/s in float32 and in the
   precision ``extract.cpu_precision=auto`` resolves to (cosine to float32 checked).

GPU half (skipped, and said so, without CUDA):

4. stages 01-07 of the demo on CUDA with AMP (bf16), channels_last and ``train.compile=false``,
   then stages 03-07 again in a copy of that run with ``train.compile=true``; each must finish
   with a test accuracy of at least 0.5 (the untrained demo network already scores about 0.9);
5. stage 03 under ``torchrun --nproc_per_node=1`` on CUDA, in another copy;
6. the demo store's vectors (made on the GPU, AMP) against the same images embedded on the CPU in
   float32 with the same checkpoint: cosine at least 0.999 each;
7. SE-ResNeXt-50's vectors of step 3 embedded on the GPU, in float32 (TF32 off: cosine to the CPU
   at least 0.9999) and with AMP bf16 + channels_last (what stage 04 runs: at least 0.999);
8. SE-ResNeXt-50 training (``Trainer.step``: AMP bf16, channels_last, batch ``--train-batch``
   images of two views) and embedding (``--embed-batch``): images/s and peak GPU memory;
9. FAISS on the GPU when the FAISS GPU build is installed: ``search.index=ivfpq`` at its defaults
   (``pq_m`` 64, 8 bits: float16 look-up tables) built and searched on ``cuda:0``, its top-1 class
   equal to exact search's for at least 90 % of the queries.

Prints one table; exit status 1 when any check fails (a mismatch, a stage that stopped), 0 otherwise.

Usage:  python benchmarks/gpu_check.py [--cpu-only] [--keep DIR] [--train-batch 64] [--embed-batch 256]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STAGE_TIMEOUT = 300  # seconds for one pipeline call; the whole check aims at under 8 minutes on one GPU
N_REF = 16  # SE-ResNeXt-50 reference images (224 px)
ROWS: list[list[str]] = []
FAILED: list[str] = []
SKIPPED = "skipped (no GPU)"


def row(check: str, result: str, ok: bool | None) -> None:
    """One line of the final table; ``ok`` None = skipped."""
    status = "ok" if ok else ("skipped" if ok is None else "FAILED")
    result = " / ".join(x.strip() for x in result.splitlines() if x.strip())  # one table line
    ROWS.append([check, result, status])
    if ok is False:
        FAILED.append(check)
    print(f"  {status:7s} {check}: {result}", flush=True)


def attempt(check: str, fn: Callable[[], tuple[str, bool]]) -> None:
    """Run one check; an exception is a failed check (its first line in the table), never the end of the run."""
    t0 = time.perf_counter()
    try:
        result, ok = fn()
    except Exception as e:  # noqa: BLE001 - every check gets its row
        result, ok = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", False
    row(check, f"{result} ({time.perf_counter() - t0:.0f} s)", ok)


def call(args: list[str], timeout: int = STAGE_TIMEOUT, env: dict | None = None) -> tuple[int, str]:
    """(exit code, the output's last lines) of a command run from the repository root."""
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])
    return p.returncode, tail


def pipeline_args(run: Path, *args: str) -> list[str]:
    """``run_pipeline.py`` on ``run``: a new run is the demo (``configs/demo.yaml`` on the rendered
    digits, what ``python run_pipeline.py`` alone runs; given ``--run`` alone, run_pipeline would start
    a new run from ``configs/default.yaml``); an existing run keeps its own configuration."""
    if (run / "config.yaml").is_file():
        return [sys.executable, "run_pipeline.py", "--run", str(run), *args]
    from common.data.demo import render_digits

    root = render_digits(ROOT / ".cache" / "demo" / "digits")  # once: what run_pipeline.py alone renders
    return [sys.executable, "run_pipeline.py", "-c", "configs/demo.yaml", "--run", str(run), *args, f"data.root={root}"]


def pipeline(run: Path, *args: str) -> tuple[int, str]:
    return call(pipeline_args(run, *args))


def torchrun(n: int, script: str, *args: str) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node=n script args`` (``run.dir=`` names the run: torchrun
    takes ``--run`` for its own ``--run-path``)."""
    return call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script,
                 *args])


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def copy_run(src: Path, dst: Path, stages: tuple[str, ...]) -> Path:
    """A new run folder with ``src``'s configuration and the given finished stages."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    for s in stages:
        shutil.copytree(src / s, dst / s, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- SE-ResNeXt-50


def seresnext() -> torch.nn.Module:
    from common.config.schema import ModelConfig
    from common.model.network import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="seresnext50_32x4d", pretrained="none", image_size=224))


def ref_images() -> torch.Tensor:
    return torch.randn(N_REF, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def cpu_reference(state: dict) -> tuple[str, bool]:
    from common.model.embed import embed_batch, prepare_model
    from common.runtime.device import resolve_cpu_precision

    model = prepare_model(seresnext(), torch.device("cpu"), channels_last=True)
    x = ref_images()
    out, rate = {}, {}
    for prec in ("fp32", resolve_cpu_precision("auto")):
        embed_batch(model, x[:2], "encoder", "off", "cpu", True, prec)  # warm-up
        t0 = time.perf_counter()
        out[prec] = embed_batch(model, x, "encoder", "off", "cpu", True, prec)
        rate[prec] = N_REF / (time.perf_counter() - t0)
    state["cpu_ref"] = out["fp32"]
    auto = resolve_cpu_precision("auto")
    cos = float(F.cosine_similarity(out[auto], out["fp32"]).min())
    return (f"fp32 {rate['fp32']:.1f} img/s; auto = {auto}: {rate[auto]:.1f} img/s, min cosine to fp32 {cos:.6f}",
            cos >= 0.999)


# ----------------------------------------------------------------------------- CPU half


def cpu_half(work: Path, state: dict) -> None:
    run = work / "cpu"

    def demo_01_02() -> tuple[str, bool]:
        rc, tail = pipeline(run, "--to", "2", "run.device=cpu", "data.num_workers=2")
        return (f"exit {rc}" if rc == 0 else f"exit {rc}: {tail}"), rc == 0

    attempt("demo stages 01-02 (CPU)", demo_01_02)

    def gloo_pair() -> tuple[str, bool]:
        if not (run / "02_mean_std_variables" / "manifest.json").is_file():
            return "needs stages 01-02", False
        rc, tail = torchrun(2, "03_main_supcon.py", f"run.dir={run}", "run.device=cpu", "train.epochs=1",
                            "train.max_steps_per_epoch=2", "train.batch_size=16", "train.eval_every=1",
                            "data.num_workers=0")
        if rc != 0:
            return f"exit {rc}: {tail}", False
        m = manifest(run, "03_main_supcon")
        return f"exit 0, world_size {m['world_size']}, device {m['device']}", m["world_size"] == 2

    attempt("stage 03 under torchrun, 2 processes, run.device=cpu (gloo)", gloo_pair)
    attempt("SE-ResNeXt-50 224 px on the CPU (reference vectors)", lambda: cpu_reference(state))


# ----------------------------------------------------------------------------- GPU half


def gpu_half(work: Path, state: dict, a: argparse.Namespace) -> None:
    off, on, tr = work / "gpu_compile_off", work / "gpu_compile_on", work / "gpu_torchrun"
    gpu = ["run.device=cuda", "train.amp=bf16", "extract.amp=bf16", "model.channels_last=true", "train.epochs=3",
           "train.eval_every=1", "data.num_workers=4"]

    def accuracy(run: Path) -> float:
        return float(manifest(run, "07_inference")["metrics"].get("accuracy", float("nan")))

    def demo_off() -> tuple[str, bool]:
        rc, tail = pipeline(off, *gpu, "train.compile=false")
        if rc != 0:
            return f"exit {rc}: {tail}", False
        acc = accuracy(off)
        return f"exit 0, test accuracy {acc:.4f}; device {manifest(off, '03_main_supcon')['device']}", acc >= 0.5

    attempt("demo 01-07 on CUDA, AMP bf16, channels_last, compile off", demo_off)

    def demo_on() -> tuple[str, bool]:
        copy_run(off, on, ("01_random_split_dataset", "02_mean_std_variables"))
        rc, tail = pipeline(on, "--from", "3", *gpu, "train.compile=true")
        if rc != 0:
            return f"exit {rc}: {tail}", False
        acc = accuracy(on)
        return f"exit 0, test accuracy {acc:.4f}", acc >= 0.5

    attempt("demo 03-07 on CUDA, AMP bf16, channels_last, compile on", demo_on)

    def one_gpu_torchrun() -> tuple[str, bool]:
        copy_run(off, tr, ("01_random_split_dataset", "02_mean_std_variables"))
        rc, tail = torchrun(1, "03_main_supcon.py", f"run.dir={tr}", *gpu, "train.compile=false")
        if rc != 0:
            return f"exit {rc}: {tail}", False
        m = manifest(tr, "03_main_supcon")
        return f"exit 0, device {m['device']}, best val macro-F1 {m['metrics'].get('best_val_macro_f1')}", True

    attempt("stage 03 under torchrun --nproc_per_node=1 (CUDA)", one_gpu_torchrun)
    attempt("demo store (GPU, AMP) vs the same images on the CPU (fp32)", lambda: store_vs_cpu(off))
    attempt("SE-ResNeXt-50 vectors, GPU vs CPU", lambda: gpu_vs_cpu(state))
    attempt(f"SE-ResNeXt-50 training, batch {a.train_batch} x 2 views, AMP bf16", lambda: train_speed(a.train_batch))
    attempt(f"SE-ResNeXt-50 embedding, batch {a.embed_batch}, AMP bf16", lambda: embed_speed(a.embed_batch))
    attempt("FAISS ivfpq at the defaults on cuda:0", faiss_gpu)


def store_vs_cpu(run: Path) -> tuple[str, bool]:
    from common.config.load import load_config
    from common.data.images import load_rgb
    from common.data.transforms import eval_transform
    from common.model.checkpoint import load_checkpoint_model
    from common.model.embed import embed_batch, prepare_model
    from common.stages.artefacts import read_model_json, store_of
    from common.store.maintenance import open_store

    stage04 = run / "04_extract_features"
    meta = read_model_json(stage04)
    ck = Path(meta["checkpoint"])
    model, _ = load_checkpoint_model(ck if ck.is_absolute() else run / ck)
    model = prepare_model(model, torch.device("cpu"), channels_last=True)
    tf = eval_transform(meta["image_size"], meta["mean"], meta["std"], meta["pad_fill"])
    with open_store(store_of(stage04, load_config().store.password_env)) as st:
        ids, _, X = st.load_matrix("test", int(meta["model_id"]))
        path = {r.id: r.path for r in st.images("test")}
    x = torch.stack([tf(load_rgb(path[int(i)])) for i in ids])
    v = embed_batch(model, x, meta["embedding"], "off", "cpu", True, "fp32")
    cos = F.cosine_similarity(v, torch.from_numpy(np.asarray(X, dtype=np.float32))).min().item()
    return f"{len(ids)} test images, min cosine {cos:.6f}", cos >= 0.999


def gpu_vs_cpu(state: dict) -> tuple[str, bool]:
    from common.model.embed import embed_batch, prepare_model

    if "cpu_ref" not in state:
        return "no CPU reference (step 3 failed)", False
    dev = torch.device("cuda", 0)
    model = prepare_model(seresnext(), dev, channels_last=True)
    x = ref_images()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # cuDNN's default is TF32
    try:
        v32 = embed_batch(model, x, "encoder", "off", dev, True).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    v16 = embed_batch(model, x, "encoder", "bf16", dev, True).cpu()
    c32 = F.cosine_similarity(v32, state["cpu_ref"]).min().item()
    c16 = F.cosine_similarity(v16, state["cpu_ref"]).min().item()
    return f"min cosine to CPU fp32: GPU fp32 {c32:.6f} (>= 0.9999), GPU AMP bf16 {c16:.6f} (>= 0.999)", \
        c32 >= 0.9999 and c16 >= 0.999


def train_speed(batch: int, steps: int = 8) -> tuple[str, bool]:
    from common.config.load import load_config
    from common.training.trainer import Trainer

    cfg = load_config(None, ["model.backbone=seresnext50_32x4d", "model.image_size=224", "train.amp=bf16",
                             "model.channels_last=true", f"train.batch_size={batch}"])
    dev = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats(dev)
    trainer = Trainer(seresnext(), cfg, dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 3, 224, 224, generator=g).pin_memory()
    y = torch.randint(0, 10, (batch,), generator=g)
    idx = torch.arange(batch)
    for _ in range(2):  # warm-up (cuDNN's benchmark picks its kernels)
        trainer.step(x, y, idx, lr=0.01)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    losses = [trainer.step(x, y, idx, lr=0.01) for _ in range(steps)]
    torch.cuda.synchronize(dev)
    rate = batch * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30
    ok = all(np.isfinite(losses))
    return f"{rate:.0f} images/s ({2 * rate:.0f} views/s), peak {peak:.1f} GiB, losses finite: {ok}", ok


def embed_speed(batch: int, batches: int = 8) -> tuple[str, bool]:
    from common.model.embed import embed_batch, prepare_model

    dev = torch.device("cuda", 0)
    model = prepare_model(seresnext(), dev, channels_last=True)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).pin_memory()
    torch.cuda.reset_peak_memory_stats(dev)
    embed_batch(model, x, "encoder", "bf16", dev, True)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(batches):
        v = embed_batch(model, x, "encoder", "bf16", dev, True)
    torch.cuda.synchronize(dev)
    rate = batch * batches / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30
    ok = bool(torch.isfinite(v).all())
    return f"{rate:.0f} images/s (host-to-GPU copies included), peak {peak:.1f} GiB", ok


def faiss_gpu() -> tuple[str, bool | None]:
    from types import SimpleNamespace

    from common.config.schema import SearchConfig
    from common.retrieval import search as retrieval_search
    from common.retrieval.ann import agreement, build_index, gpu_available

    if not gpu_available():
        return "skipped: the FAISS GPU build is not installed (faiss-cpu)", None
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 2048)).astype(np.float32)
    labels = rng.integers(0, 50, 20_000)
    X = centres[labels] + 0.5 * rng.standard_normal((20_000, 2048)).astype(np.float32) / np.sqrt(2048)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q, G, gl = X[:500], X[500:], labels[500:]
    scfg = SimpleNamespace(**{**SearchConfig().__dict__, "index": "ivfpq"})
    ann = build_index(G, scfg, seed=0, progress=False, device=torch.device("cuda", 0))
    ann.set_query_params(scfg)
    _, rows = ann.search(Q, 5, G)
    _, er = retrieval_search.topk(Q, G, 5)
    agr = agreement(np.asarray(er), rows, gl)
    on_gpu = bool(ann.gpu_copy)
    return (f"on the GPU: {on_gpu}; top-1 class as exact search for {agr['same_class']:.3f} of the queries",
            on_gpu and agr["same_class"] >= 0.9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-only", action="store_true", help="run the CPU half only (automatic without CUDA)")
    p.add_argument("--keep", default=None, metavar="DIR", help="run folders go here and are kept (default: a "
                   "temporary folder, removed)")
    p.add_argument("--train-batch", type=int, default=64, help="SE-ResNeXt-50 training images per step")
    p.add_argument("--embed-batch", type=int, default=256, help="SE-ResNeXt-50 embedding batch")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu_only
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}; CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
          f"{' (--cpu-only)' if a.cpu_only and torch.cuda.is_available() else ''}; {os.cpu_count()} CPUs", flush=True)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    try:
        cpu_half(work, state)
        if cuda:
            gpu_half(work, state, a)
        else:
            for check in ("demo 01-07 on CUDA, compile off and on", "stage 03 under torchrun --nproc_per_node=1",
                          "demo store and SE-ResNeXt-50 vectors, GPU vs CPU", "SE-ResNeXt-50 training and "
                          "embedding images/s, peak GPU memory", "FAISS ivfpq on the GPU"):
                row(check, SKIPPED, None)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    w = [max(len(r[i]) for r in [["check", "result", "status"], *ROWS]) for i in range(3)]
    print("\n| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(("check", "result", "status"))) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in ROWS:
        print("| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(r)) + " |")
    print(f"\n{len(ROWS) - len(FAILED)} of {len(ROWS)} checks passed or skipped in {time.perf_counter() - t0:.0f} s"
          + ("" if cuda else "; the GPU half was SKIPPED (no CUDA" + (", --cpu-only" if a.cpu_only else "") + ")"))
    if FAILED:
        print("FAILED: " + "; ".join(FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
