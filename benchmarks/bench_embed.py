"""Benchmark: the CPU embedding of stages 04 and 07 (``common.model.embed``), every variant side by side.

Prints the CPU's flags and the load, then, for SE-ResNeXt-50 (timm ``seresnext50_32x4d``, random
weights, no download) at 224 px on one fixed batch of random images, each variant's images/s:

- ``fp32`` (the path before ``extract.cpu_precision``: contiguous memory, float32),
- ``fp32 channels_last`` (``embed.prepare_model``: channels_last, batch norms folded into the
  convolutions),
- ``bf16 channels_last`` (the same with ``torch.autocast("cpu", bfloat16)``:
  ``extract.cpu_precision=bf16``, what stages 04 and 07 run on a CPU with native bfloat16),
- ``bf16 compiled`` (``embed.CompiledCpuModel``: ``torch.compile``, inductor, weights frozen;
  ``extract.cpu_compile``), its compile time apart; ``--no-compile`` leaves it out,
- ``onnxruntime fp32`` when ``onnxruntime`` is installed (not a dependency of the pipeline:
  ``pip install onnxruntime onnx`` to include it; its CPU provider has no bfloat16 convolutions).

The variants are timed interleaved (round 1: every variant once, round 2: ...) in this one
process, so that a load that changes over the run hits them alike; the tables give medians
over the rounds of wall-clock images/s and of images per CPU-second of this process (less
sensitive to other processes on a shared machine), each with its ratio to ``fp32``, and every
variant's smallest cosine between its vector and the ``fp32`` one of the same image.

Then the prediction check: every image of a labelled folder embedded with each precision
(gallery and queries alike), each query classified by its nearest gallery image (top-1) and by
the weighted k-NN vote of stage 07 (``retrieval.knn_vote``, k 10, T 0.07): bf16's predictions
must be identical to float32's (the compiled row, opt-in, is shown with the float32 gap of each
answer it changes: how near a tie it was). ``--run RUN`` (default ``runs/demo`` when its stage 04 finished): the
images of a finished run (its ``splits.csv``: train = gallery, test = queries) with its trained
checkpoint and preprocessing (``model.json``). Without one: scikit-learn's digits (the demo's
images, rendered into ``.cache/demo/digits``), every fifth image a query, with a random-weight
``resnet10t`` at 32 px; random features have near-ties that a rounding flips, so there the
differences are shown, not checked.

Exit status 1 when a cosine is below 0.999, or a trained run's prediction differs.

Usage:  python benchmarks/bench_embed.py [--quick] [--rounds 5] [--batch 16] [--threads N]
                                         [--no-compile] [--run runs/demo]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.model.embed import CompiledCpuModel, embed_batch, prepare_model  # noqa: E402
from common.runtime.device import cpu_flags, resolve_cpu_precision  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
MIN_COSINE = 0.999


def load_text() -> str:
    """``uptime``'s line (the load averages), or ``os.getloadavg`` where ``uptime`` is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class Encoder(torch.nn.Module):
    """A timm backbone as ``SupConModel.encoder`` sees it (pooled features), for ``embed_batch``."""

    def __init__(self, name: str):
        import timm

        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0)

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def onnx_variant(model: torch.nn.Module, x: torch.Tensor, threads: int):
    """``(run(x) -> vectors, setup seconds)`` with ONNX Runtime (float32), or None when not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    t0 = time.perf_counter()
    path = Path(tempfile.mkdtemp()) / "encoder.onnx"
    torch.onnx.export(model.backbone, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(xb: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(sess.run(None, {"x": xb.contiguous().numpy()})[0])
        return F.normalize(y.float(), dim=1)

    run(x)
    return run, time.perf_counter() - t0


def throughput(a: argparse.Namespace) -> tuple[list[list], bool]:
    """The variants' table rows and whether every cosine is at least ``MIN_COSINE``."""
    size, name = (64, "seresnext50_32x4d") if a.quick else (224, "seresnext50_32x4d")
    x = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    base = Encoder(name).eval()
    cl = prepare_model(copy.deepcopy(base), torch.device("cpu"), channels_last=True)
    variants: dict = {
        "fp32": lambda xb: embed_batch(base, xb, "encoder", "off", "cpu", channels_last=False, cpu_precision="fp32"),
        "fp32 channels_last": lambda xb: embed_batch(cl, xb, "encoder", "off", "cpu", True, "fp32"),
        "bf16 channels_last": lambda xb: embed_batch(cl, xb, "encoder", "off", "cpu", True, "bf16"),
    }
    setup = {}
    if not a.no_compile:
        cm = CompiledCpuModel(prepare_model(copy.deepcopy(base), torch.device("cpu"), True), a.batch)
        t0 = time.perf_counter()
        embed_batch(cm, x, "encoder", "off", "cpu", True, "bf16")  # compiles
        setup["bf16 compiled"] = time.perf_counter() - t0
        if cm.failed:
            print(f"  (torch.compile failed: {cm.failed}; the compiled row is the uncompiled model)")
        variants["bf16 compiled"] = lambda xb: embed_batch(cm, xb, "encoder", "off", "cpu", True, "bf16")
    ort_run = None if a.quick else onnx_variant(base, x, torch.get_num_threads())
    if ort_run is not None:
        variants["onnxruntime fp32"], setup["onnxruntime fp32"] = ort_run
    else:
        print("  (onnxruntime not installed, or --quick: its row is left out)")
    vecs = {k: f(x) for k, f in variants.items()}  # also the warm-up of each
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for k, f in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f(x)
            wall[k].append(a.batch / (time.perf_counter() - t0))
            cpu[k].append(a.batch / max(time.process_time() - c0, 1e-9))
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {wall[k][-1]:.1f}" for k in variants)
              + f" img/s; load {os.getloadavg()[0]:.2f}", flush=True)
    w0, c0 = statistics.median(wall["fp32"]), statistics.median(cpu["fp32"])
    rows, ok = [], True
    for k in variants:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        cos = float(F.cosine_similarity(vecs[k], vecs["fp32"]).min())
        ok &= cos >= MIN_COSINE
        rows.append([k, f"{w:.2f}", f"{w / w0:.2f}x", f"{c:.2f}", f"{c / c0:.2f}x", f"{cos:.6f}",
                     f"{setup[k]:.0f} s" if k in setup else ""])
    print(f"\n{name} at {size} px, batch {a.batch}, {torch.get_num_threads()} torch thread(s), medians of "
          f"{a.rounds} interleaved rounds:")
    table(["variant", "img/s (wall)", "ratio", "img per CPU-s", "ratio", "min cosine to fp32", "setup"], rows)
    return rows, ok


def table(header: list[str], rows: list[list]) -> None:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(header)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(str(v).ljust(w[i]) for i, v in enumerate(r)) + " |")


# ----------------------------------------------------------------------------- prediction identity


def _images_of_run(run: Path):
    """(model, transform, gallery paths/labels, query paths/labels, image size) of a finished run."""
    from common.data.splits import read_splits
    from common.data.transforms import eval_transform
    from common.model.checkpoint import load_checkpoint_model
    from common.stages.artefacts import read_model_json

    meta = read_model_json(run / "04_extract_features")
    ck = Path(meta["checkpoint"])
    model, _ = load_checkpoint_model(ck if ck.is_absolute() else run / ck)
    rows = read_splits(run / "01_random_split_dataset" / "splits.csv")
    classes = sorted({r.label for r in rows})
    lab = {c: i for i, c in enumerate(classes)}
    g = [(r.path, lab[r.label]) for r in rows if r.split == "train"]
    q = [(r.path, lab[r.label]) for r in rows if r.split == "test"]
    tf = eval_transform(meta["image_size"], meta["mean"], meta["std"], meta["pad_fill"])
    return model, tf, g, q, int(meta["image_size"]), f"{run} (trained {meta['backbone']}, its test split)"


def _digits():
    """The demo's digits with a random-weight resnet10t: every fifth image a query."""
    from common.data.demo import render_digits
    from common.data.listing import list_image_folder
    from common.data.transforms import eval_transform
    from common.model.network import SupConModel

    root = render_digits(Path(__file__).resolve().parent.parent / ".cache" / "demo" / "digits")
    files = list_image_folder(root).files
    lab = {c: i for i, c in enumerate(sorted({c for _, c in files}))}
    items = [(p, lab[c]) for p, c in files]
    q = items[::5]
    g = [it for i, it in enumerate(items) if i % 5]
    torch.manual_seed(0)
    model = SupConModel(Encoder("resnet10t").backbone, head="mlp", feat_dim=64)
    tf = eval_transform(32, [0.1, 0.1, 0.1], [0.3, 0.3, 0.3], 0)
    return model, tf, g, q, 32, "demo digits (random-weight resnet10t, every fifth image a query)"


def predictions(a: argparse.Namespace) -> tuple[bool, str]:
    """The prediction check: ``(passed, the verdict line's words)``. Only a trained run is checked;
    with random weights the differences are shown and the verdict says that nothing was checked."""
    from common.model.embed import embed_paths
    from common.retrieval.search import knn_vote, topk

    run = Path(a.run) if a.run else Path(__file__).resolve().parent.parent / "runs" / "demo"
    trained = (run / "04_extract_features" / "manifest.json").is_file()
    if a.run and not trained:
        raise SystemExit(f"{run}: stage 04 has not finished there")
    model, tf, g, q, size, what = _images_of_run(run) if trained else _digits()
    model = prepare_model(model, torch.device("cpu"), channels_last=True)
    n_classes = 1 + max(y for _, y in g + q)
    kinds = [("fp32", False), ("bf16", False)] + ([] if a.no_compile or a.quick else [("bf16", True)])
    out = {}
    for prec, comp in kinds:
        t0 = time.perf_counter()
        vec = {}
        for name, items in (("gallery", g), ("queries", q)):
            X, ok, errors, _ = embed_paths([p for p, _ in items], model, tf, size, embedding="encoder",
                                           batch_size=64, num_workers=0, device="cpu", channels_last=True,
                                           cpu_precision=prec, cpu_compile=comp, compile_min_images=0)
            assert not errors and len(ok) == len(items), errors[:3]
            vec[name] = torch.from_numpy(X)
        gy = torch.tensor([y for _, y in g])
        sims, idx = topk(vec["queries"], vec["gallery"], 10)
        sims, idx = torch.as_tensor(sims), torch.as_tensor(idx)
        knn, _ = knn_vote(sims, idx, gy, n_classes, 0.07)
        out[(prec, comp)] = (gy[idx[:, 0]].numpy(), np.asarray(knn), vec, time.perf_counter() - t0, sims, idx)
    ref = out[("fp32", False)]
    qy = np.array([y for _, y in q])
    print(f"\nPredictions: {what}: {len(g)} gallery, {len(q)} query images")
    rows, same, differ = [], True, 0
    gy = np.array([y for _, y in g])
    notes = []
    for (prec, comp), (top1, knn, vec, secs, _, _) in out.items():
        d1, dk = int((top1 != ref[0]).sum()), int((knn != ref[1]).sum())
        cos = min(float(F.cosine_similarity(vec[s], ref[2][s]).min()) for s in ("gallery", "queries"))
        if not comp:  # the default path is checked; the opt-in compiled one is shown
            same &= d1 == 0 and dk == 0 and cos >= MIN_COSINE
            differ += d1 + dk
        name = prec + (" compiled" if comp else "")
        rows.append([name, f"{(top1 == qy).mean():.4f}", f"{(knn == qy).mean():.4f}", d1, dk, f"{cos:.6f}",
                     f"{secs:.1f} s"])
        for qi in np.flatnonzero(top1 != ref[0]):  # float32's gap between its answer and the new one's class
            s32, i32 = ref[4][qi].numpy(), ref[5][qi].numpy()
            other = s32[gy[i32] == top1[qi]]
            gap = f"{s32[0] - other[0]:.2e}" if other.size else "> the 10th neighbour's"
            notes.append(f"{name}: query {qi}: top-1 class {ref[0][qi]} -> {top1[qi]}, float32 similarity gap {gap}")
    table(["precision", "top-1 acc", "k-NN acc", "top-1 != fp32", "k-NN != fp32", "min cosine", "embed time"], rows)
    for n in notes:
        print(f"  {n}")
    if not trained:
        print("(random weights: the prediction differences are shown, not checked; --run RUN checks a trained run)")
        return True, (f"predictions not checked: random weights (no finished run at {run}); bf16 changed {differ} "
                      f"of {2 * len(q)} top-1 / k-NN answers, shown above; --run RUN checks a trained run")
    return same, f"predictions identical to fp32 on {what}: {'yes' if same else 'NO'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, 2 rounds, no compile, no ONNX")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it takes minutes)")
    p.add_argument("--run", default=None, help="a finished run folder for the prediction check (default: runs/demo "
                   "when finished, else the digits with random weights)")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.batch, a.no_compile = min(a.rounds, 2), min(a.batch, 4), True
    if a.threads:
        torch.set_num_threads(a.threads)
    flags = cpu_flags()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), capability {torch.backends.cpu.get_cpu_capability()}")
    print("flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS))
    print(f"extract.cpu_precision=auto resolves to {resolve_cpu_precision('auto')} here")
    print(f"load before: {load_text()}")
    _, cos_ok = throughput(a)
    same, verdict = predictions(a)
    print(f"\nload after: {load_text()}")
    print(f"cosines >= {MIN_COSINE}: {'yes' if cos_ok else 'NO'}; {verdict}")
    return 0 if cos_ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
