"""Device decisions: torchrun device and backend (decided together), CPU precision, TF32 scope,
CPU embedding precision (bf16 autocast, channels_last) and the compiled CPU model's padding."""
from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.model.embed import (
    CPU_COMPILE_MIN_IMAGES,
    CompiledCpuModel,
    embed_batch,
    fold_batchnorm,
    prepare_model,
    use_cpu_compile,
)
from common.runtime import device as dev
from common.runtime.device import (
    ProcessPlan,
    cpu_bf16_native,
    plan_processes,
    process_plan,
    resolve_cpu_precision,
    resolve_device,
    tf32,
)


def plan(spec, world=1, local_rank=0, local_world=None, cuda=True, n_gpus=2):
    return plan_processes(spec, world, local_rank, world if local_world is None else local_world, cuda, n_gpus)


def test_one_process_devices():
    assert plan("auto") == ProcessPlan(torch.device("cuda", 0), None)
    assert plan("auto", cuda=False, n_gpus=0) == ProcessPlan(torch.device("cpu"), None)
    assert plan("cpu") == ProcessPlan(torch.device("cpu"), None)
    assert plan("cuda:1") == ProcessPlan(torch.device("cuda", 1), None)
    assert plan(" CUDA ") == ProcessPlan(torch.device("cuda", 0), None)


def test_torchrun_backend_follows_the_device():
    # run.device=cpu on a machine whose GPUs are visible: gloo, never NCCL with CPU tensors
    assert plan("cpu", world=2, local_rank=1) == ProcessPlan(torch.device("cpu"), "gloo")
    assert plan("auto", world=2, local_rank=1, cuda=False, n_gpus=0) == ProcessPlan(torch.device("cpu"), "gloo")
    # each process on the GPU of its LOCAL_RANK, with NCCL
    assert plan("auto", world=2, local_rank=1) == ProcessPlan(torch.device("cuda", 1), "nccl")
    assert plan("cuda", world=4, local_rank=1, local_world=2) == ProcessPlan(torch.device("cuda", 1), "nccl")


@pytest.mark.parametrize("kwargs, words", [
    (dict(spec="cuda:0", world=2), ("cuda:0", "2 processes", "run.device=cuda")),
    (dict(spec="auto", world=4, local_world=4, n_gpus=2), ("4 processes", "only 2 GPU", "--nproc_per_node=2")),
    (dict(spec="cuda", world=3, n_gpus=2), ("3 processes", "only 2 GPU")),
    (dict(spec="cuda:2"), ("cuda:2", "only 2 GPU")),
    (dict(spec="cuda", cuda=False, n_gpus=0), ("no CUDA GPU",)),
    (dict(spec="gpu"), ("expected auto, cpu, cuda or cuda:N",)),
    (dict(spec="cuda:x"), ("expected auto, cpu, cuda or cuda:N",)),
])
def test_refusals_are_one_line(kwargs, words):
    with pytest.raises(ConfigError) as e:
        plan(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run.device")
    for w in words:
        assert w in msg


def test_resolve_device_reads_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine but only 1 GPU"):
        resolve_device("auto")
    assert process_plan("cpu") == ProcessPlan(torch.device("cpu"), "gloo")


def test_cpu_precision(monkeypatch):
    assert resolve_cpu_precision("fp32") == "fp32"
    assert resolve_cpu_precision("bf16") == "bf16"
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    assert resolve_cpu_precision("auto") == "bf16"
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: False)
    assert resolve_cpu_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="extract.cpu_precision"):
        resolve_cpu_precision("fp16")


def test_cpu_bf16_native_follows_the_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not cpu_bf16_native()
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert cpu_bf16_native() == (torch.backends.mkldnn.is_available() and sys.platform == "linux")


def test_tf32_only_inside_the_block():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError), tf32(True):
            raise ValueError("restored on errors too")
        assert not torch.backends.cuda.matmul.allow_tf32
        with tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


# ----------------------------------------------------------------------------- CPU embedding


class _Net(torch.nn.Module):
    """A small convolutional encoder with batch norm, in the shape ``embed_batch`` expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(32, 8)
        self.calls: list[tuple] = []

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last), x.dtype))
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)).float(), dim=1)


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(1))


def test_cpu_bf16_embedding_is_close_to_fp32_and_normalised():
    net = prepare_model(_Net(), torch.device("cpu"), channels_last=True)
    x = _images()
    v32 = embed_batch(net, x, "encoder", "off", "cpu", True, "fp32")
    v16 = embed_batch(net, x, "encoder", "off", "cpu", True, "bf16")
    assert net.calls[-1][1]  # channels_last input on the CPU
    assert v16.dtype == torch.float32 and torch.allclose(v16.norm(dim=1), torch.ones(len(x)), atol=1e-6)
    assert not torch.equal(v16, v32)  # the bf16 path ran (autocast on the CPU)
    assert F.cosine_similarity(v16, v32).min() > 0.999
    h = embed_batch(net, x, "head", "bf16", "cpu", True, "bf16")
    assert h.shape == (len(x), 8) and torch.allclose(h.norm(dim=1), torch.ones(len(x)), atol=1e-6)


def test_cuda_amp_setting_is_ignored_on_the_cpu():
    net = prepare_model(_Net(), torch.device("cpu"), channels_last=False)
    x = _images()
    assert torch.equal(embed_batch(net, x, "encoder", "bf16", "cpu", False),
                       embed_batch(net, x, "encoder", "off", "cpu", False))
    assert not net.calls[-1][1]


def test_use_cpu_compile(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/c++")
    assert use_cpu_compile(True, "cpu", CPU_COMPILE_MIN_IMAGES)
    assert not use_cpu_compile(True, "cpu", CPU_COMPILE_MIN_IMAGES - 1)  # compiling would cost more
    assert use_cpu_compile(True, "cpu", 1, min_images=0) and not use_cpu_compile(True, "cpu", 0, min_images=0)
    assert not use_cpu_compile(False, "cpu", 10**6)  # the default
    assert not use_cpu_compile(True, "cuda:0", 10**6)  # CUDA has train.compile / its own kernels
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not use_cpu_compile(True, "cpu", 10**6)  # inductor needs a C++ compiler


def test_compiled_cpu_model_pads_every_batch_to_one_shape(monkeypatch):
    compiled: list[dict] = []

    def fake_compile(fn, **kw):
        compiled.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = prepare_model(_Net(), torch.device("cpu"), channels_last=True)
    x = _images(11)
    want = embed_batch(net, x, "encoder", "off", "cpu", True)
    cm = CompiledCpuModel(net, batch_size=4)
    got = torch.cat([embed_batch(cm, x[a:a + 4], "encoder", "off", "cpu", True) for a in range(0, 11, 4)])
    assert torch.allclose(got, want, atol=1e-6)
    assert {c[0] for c in net.calls[-3:]} == {(4, 3, 24, 24)} and all(c[1] for c in net.calls[-3:])
    assert compiled == [{"dynamic": False, "options": {"freezing": True}}]  # one graph for the whole job
    embed_batch(cm, x[:9], "encoder", "off", "cpu", True)  # more than a batch: split, still 4 rows a call
    assert {c[0] for c in net.calls[-3:]} == {(4, 3, 24, 24)}


def test_compiled_cpu_model_falls_back_in_one_line(monkeypatch, caplog):
    def broken_compile(fn, **kw):
        def run(x):
            raise RuntimeError("InductorError: no C++ compiler\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = prepare_model(_Net(), torch.device("cpu"), channels_last=True)
    x = _images(3)
    cm = CompiledCpuModel(net, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="common.model"):
        got = embed_batch(cm, x, "encoder", "off", "cpu", True)
        again = embed_batch(cm, x, "encoder", "off", "cpu", True)
    assert torch.equal(got, embed_batch(net, x, "encoder", "off", "cpu", True)) and torch.equal(got, again)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "long traceback" not in warnings[0]
    assert cm.failed is not None


def test_batch_norms_fold_into_the_convolutions_on_the_cpu():
    from common.model.network import SupConModel

    class Backbone(torch.nn.Sequential):
        num_features = 16

    torch.manual_seed(0)
    backbone = Backbone(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with torch.no_grad():  # statistics away from the identity, so that folding matters
        backbone[1].running_mean.uniform_(-1, 1)
        backbone[1].running_var.uniform_(0.5, 2)
        backbone[1].weight.uniform_(0.5, 2)
    model = SupConModel(backbone, head="linear", feat_dim=4)
    x = _images()
    want = embed_batch(model.eval(), x, "encoder", "off", "cpu", False)
    assert not fold_batchnorm(SupConModel(Backbone(torch.nn.Conv2d(3, 4, 1)), "linear", 4).train())  # training
    prepared = prepare_model(model, torch.device("cpu"), channels_last=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.backbone.modules())
    assert prepared.backbone.num_features == 16
    got = embed_batch(prepared, x, "encoder", "off", "cpu", True)
    assert torch.allclose(got, want, atol=1e-6) and not torch.equal(got, want)
