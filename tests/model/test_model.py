"""Backbone + projection head: shapes, normalisation, pretrained weight files, checkpoint round trip."""
from __future__ import annotations

import pytest
import timm
import torch

from common.config.schema import ModelConfig
from common.errors import UserError
from common.fileio import sha256_file
from common.model.checkpoint import load_checkpoint_model
from common.model.network import SupConModel, build_model

BACKBONE = "test_resnet"  # timm's tiny test network: 96-d pooled features


def _mcfg(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": BACKBONE, "image_size": 24, "feat_dim": 16, **kw})


@pytest.fixture(scope="module")
def timm_net() -> torch.nn.Module:
    """A plain timm test_resnet *with* its ImageNet classifier, as a downloaded timm file holds."""
    torch.manual_seed(123)
    return timm.create_model(BACKBONE, pretrained=False)


def _same_backbone(model: SupConModel, net: torch.nn.Module) -> bool:
    ref = net.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.backbone.state_dict().items())


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_pooled_dims_and_normalised_head(head):
    torch.manual_seed(0)
    m = build_model(_mcfg(head=head)).eval()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        f, z = m.encoder(x), m(x)
    assert m.dim_in == 96 and f.shape == (3, 96)
    assert z.shape == (3, 16) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    n_lin = sum(isinstance(mod, torch.nn.Linear) for mod in m.head.modules())
    assert n_lin == (2 if head == "mlp" else 1)
    if head == "mlp":  # Linear(dim_in, dim_in) - ReLU - Linear(dim_in, feat_dim), as SupConResNet
        assert m.head[0].in_features == m.head[0].out_features == 96 and m.head[2].out_features == 16


def test_grad_checkpointing_trains():
    m = build_model(_mcfg(grad_checkpointing=True)).train()
    m(torch.randn(4, 3, 24, 24)).sum().backward()
    assert m.backbone.conv1[0].weight.grad is not None


def test_plain_timm_file_with_module_prefix_loads_and_ignores_classifier(tmp_path, timm_net, caplog):
    sd = {f"module.{k}": v for k, v in timm_net.state_dict().items()}  # saved from DataParallel
    assert "module.fc.weight" in sd
    p = tmp_path / "plain.pth"
    torch.save({"state_dict": sd}, p)
    caplog.set_level("INFO", logger="common.model")
    m = build_model(_mcfg(pretrained=str(p)))
    assert _same_backbone(m, timm_net)
    assert "classifier" in caplog.text and "no projection head" in caplog.text


def test_safetensors_file_loads(tmp_path, timm_net):
    from safetensors.torch import save_file

    p = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in timm_net.state_dict().items()}, str(p))
    assert _same_backbone(build_model(_mcfg(pretrained=str(p))), timm_net)


def test_supcon_file_loads_backbone_and_matching_head(tmp_path):
    torch.manual_seed(5)
    src = build_model(_mcfg())
    # the reference SupContrast layout: encoder wrapped in DataParallel, head beside it
    sd = {k.replace("backbone.", "encoder.module."): v for k, v in src.state_dict().items()}
    p = tmp_path / "supcon.pth"
    torch.save({"model": sd, "epoch": 3}, p)
    torch.manual_seed(6)
    m = build_model(_mcfg(pretrained=str(p)))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    # a head of another size in the file is a mismatch, not silently dropped
    with pytest.raises(UserError, match=r"projection head.*shape mismatches 2"):
        build_model(_mcfg(pretrained=str(p), feat_dim=8))


def test_backbone_mismatch_lists_missing_and_unexpected_keys(tmp_path, timm_net):
    sd = dict(timm_net.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["conv1.0.weight"]
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    with pytest.raises(UserError) as e:
        build_model(_mcfg(pretrained=str(p)))
    msg = str(e.value)
    assert str(p) in msg and "missing keys 1 (conv1.0.weight)" in msg and "unexpected keys 1 (extra.weight)" in msg
    assert "\n" not in msg
    other = timm.create_model("resnet10t", pretrained=False).state_dict()  # another architecture
    p2 = tmp_path / "other.pt"
    torch.save(other, p2)
    with pytest.raises(UserError, match=r"missing keys \d+ \(.*, \.\.\.\); unexpected keys \d+"):
        build_model(_mcfg(pretrained=str(p2)))


def test_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        build_model(_mcfg(pretrained=str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read"):
        build_model(_mcfg(pretrained=str(junk)))

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match=r"could not fetch timm pretrained weights for test_resnet \(no internet\?\)"):
        build_model(_mcfg(pretrained="timm"))
    with pytest.raises(UserError, match="not a timm model"):
        build_model(_mcfg(backbone="no_such_net"))


def _checkpoint(path, model: SupConModel, mcfg: ModelConfig) -> None:
    from common.config.schema import Config
    from common.runtime.seed import rng_state

    cfg = Config()
    cfg.model = mcfg
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 24, 24)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state
    torch.save({"format": "plankton-supcon/1", "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": {"epoch": 2, "step_in_epoch": 0}, "scaler": {}, "epoch": 1, "step": 7,
                "rng": rng_state(), "config": cfg.to_dict(), "classes": ["a", "b"],
                "stats": {"mean": [0.1] * 3, "std": [0.2] * 3}, "metrics": [{"epoch": 1, "loss": 1.5}]}, path)


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(1)
    mcfg = _mcfg(head="linear", feat_dim=8, pretrained="timm")  # pretrained must not be used on reload
    model = build_model(_mcfg(head="linear", feat_dim=8))
    p = tmp_path / "ck.pt"
    _checkpoint(p, model, mcfg)
    raw = torch.load(p, map_location="cpu", weights_only=True)  # every entry is weights_only-safe
    assert raw["classes"] == ["a", "b"] and len(raw["optimizer"]["state"]) > 0
    m2, ck = load_checkpoint_model(p)
    assert not m2.training and ck["sha256"] == sha256_file(p) and ck["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    x = torch.randn(2, 3, 24, 24)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(m2(x), model(x)) and torch.allclose(m2.encoder(x), model.encoder(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="missing: run 03_main_supcon.py"):
        load_checkpoint_model(tmp_path / "checkpoints" / "best.pt")
    p = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, p)
    with pytest.raises(UserError, match="not a 03_main_supcon.py checkpoint"):
        load_checkpoint_model(p)
    p.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint_model(p)
