"""Known-answer tests of the SupCon loss (Khosla et al. 2020, eq. 2, ``L_out``)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.model.loss import SupConLoss, supcon_loss


def loop_supcon(features: torch.Tensor, labels=None, mask=None, temperature: float = 0.07,
                base_temperature: float = 0.07, contrast_mode: str = "all") -> float:
    """Eq. 2 of the paper written as loops, one anchor and one positive at a time (float64).

    Anchors without a positive are left out of the mean (as ``common.losses`` documents).
    """
    f = features.detach().double()
    B, V, _ = f.shape
    items = [(b, v) for b in range(B) for v in range(V)]  # every contrast vector
    anchors = [(b, v) for (b, v) in items if contrast_mode == "all" or v == 0]

    def positive(i, j) -> bool:
        if mask is not None:
            return bool(mask[i[0], j[0]])
        if labels is None:
            return i[0] == j[0]
        return int(labels[i[0]]) == int(labels[j[0]])

    losses = []
    for i in anchors:
        zi = f[i[0], i[1]]
        others = [a for a in items if a != i]  # A(i)
        denom = sum(math.exp(float(zi @ f[a[0], a[1]]) / temperature) for a in others)
        P = [p for p in others if positive(i, p)]
        if not P:
            continue
        s = sum(math.log(math.exp(float(zi @ f[p[0], p[1]]) / temperature) / denom) for p in P)
        losses.append(-(temperature / base_temperature) * s / len(P))
    return sum(losses) / len(losses) if losses else 0.0


def rand_features(B: int, V: int, D: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, V, D, generator=g, dtype=dtype), dim=-1)


def test_hand_computed_value():
    # B=2 images, V=2 views, D=2, T = T_base = 1. Image 0: both views (1, 0); image 1: both (0, 1).
    # Anchor z = (1, 0): its other view has dot 1, the two vectors of image 1 have dot 0, so the
    # denominator is e^1 + e^0 + e^0 = e + 2 for every anchor (by symmetry).
    # Different labels: P(i) = {the other view}: loss = -(1 - log(e + 2)) = log(e + 2) - 1 = 0.551444...
    # Same labels: P(i) = all three others, dots 1, 0, 0: loss = -(1/3 - log(e + 2)) = 1.218111...
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    crit = SupConLoss(temperature=1.0, base_temperature=1.0)
    assert crit(x, torch.tensor([0, 1])).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    assert crit(x, torch.tensor([3, 3])).item() == pytest.approx(math.log(math.e + 2) - 1 / 3, abs=1e-6)
    # SimCLR (labels None) on this input is the different-labels case.
    assert crit(x).item() == pytest.approx(0.551444, abs=1e-6)
    # T = 0.5, T_base = 1: logits double and the loss is scaled by T / T_base = 0.5:
    # 0.5 * (log(7.389056 + 2) - 2) = 0.5 * (2.239544 - 2) = 0.119772...
    half = SupConLoss(temperature=0.5, base_temperature=1.0)
    assert half(x, torch.tensor([0, 1])).item() == pytest.approx(0.5 * (math.log(math.e ** 2 + 2) - 2), abs=1e-6)
    assert half(x, torch.tensor([0, 1])).item() == pytest.approx(0.119772, abs=1e-6)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_loop_of_equation_2(mode, temperature, with_labels):
    for seed, (B, V, D) in enumerate([(6, 2, 5), (7, 3, 4), (5, 1, 3)]):
        x = rand_features(B, V, D, seed)
        labels = torch.tensor([0, 1, 0, 2, 1, 1, 0][:B]) if with_labels else None
        got = supcon_loss(x, labels, temperature=temperature, base_temperature=0.07, contrast_mode=mode)
        want = loop_supcon(x, labels, temperature=temperature, base_temperature=0.07, contrast_mode=mode)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want, abs=1e-6, rel=1e-9), (seed, B, V, D)


@pytest.mark.parametrize("mode", ["all", "one"])
def test_explicit_mask_matches_loop_and_labels(mode):
    x = rand_features(6, 2, 4, seed=11)
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    eq = (labels[:, None] == labels[None, :]).float()
    assert supcon_loss(x, mask=eq, contrast_mode=mode).item() == pytest.approx(
        supcon_loss(x, labels, contrast_mode=mode).item(), abs=1e-9)
    # An asymmetric 0/1 mask (the reference accepts any (B, B) mask, row = anchor image).
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(6, 6, generator=g) < 0.4).float()
    got = supcon_loss(x, mask=m, temperature=0.2, contrast_mode=mode).item()
    assert got == pytest.approx(loop_supcon(x, mask=m, temperature=0.2, contrast_mode=mode), abs=1e-6)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_gradcheck(mode, with_labels):
    x = rand_features(5, 2, 3, seed=5).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 1]) if with_labels else None
    assert torch.autograd.gradcheck(
        lambda f: supcon_loss(f, labels, temperature=0.3, contrast_mode=mode), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_with_anchors_without_positive():
    x = rand_features(4, 1, 3, seed=8).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2])  # images 2 and 3 are alone in their class
    assert torch.autograd.gradcheck(lambda f: supcon_loss(f, labels, temperature=0.5), (x,), eps=1e-6, atol=1e-5)


def test_anchors_without_positive_are_left_out():
    x = rand_features(5, 1, 4, seed=2).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2, 1])  # image 3 has no positive (n_views = 1)
    loss = supcon_loss(x, labels)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(loop_supcon(x, labels), abs=1e-6)
    # Leaving the anchor out is not the same as counting it as 0 in the mean (the reference):
    kept = [0, 1, 2, 4]
    assert loss.item() != pytest.approx(loop_supcon(x, labels) * len(kept) / 5, abs=1e-3)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["all", "one"])
def test_no_anchor_with_a_positive_gives_zero_with_grad(mode):
    for x, labels in [(rand_features(4, 1, 3, seed=1), torch.tensor([0, 1, 2, 3])),
                      (rand_features(3, 1, 3, seed=1), None),  # SimCLR with one view
                      (rand_features(1, 1, 3, seed=1), torch.tensor([7]))]:  # a single vector
        x = x.float().requires_grad_(True)
        loss = supcon_loss(x, labels, contrast_mode=mode)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("mode", ["all", "one"])
def test_invariant_to_batch_permutation(mode):
    x = rand_features(9, 2, 6, seed=4)
    labels = torch.tensor([3, 1, 3, 0, 1, 2, 2, 3, 0])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    a = supcon_loss(x, labels, contrast_mode=mode)
    b = supcon_loss(x[perm], labels[perm], contrast_mode=mode)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # label values themselves do not matter, only their equality
    assert supcon_loss(x, labels * 10 + 5, contrast_mode=mode).item() == pytest.approx(a.item(), abs=1e-12)


def test_float32_logits_under_autocast_and_low_precision_input():
    x32 = rand_features(8, 2, 16, seed=6, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    xb = x32.to(torch.bfloat16)
    want = supcon_loss(xb.float(), labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = SupConLoss()(xb, labels)
        got_from_32 = SupConLoss()(x32, labels)
    assert got.dtype == torch.float32 and got_from_32.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert got_from_32.item() == pytest.approx(supcon_loss(x32, labels).item(), abs=1e-6)


def test_stable_at_small_temperature():
    x = rand_features(16, 2, 8, seed=9, dtype=torch.float32).requires_grad_(True)
    labels = torch.arange(16) % 4
    loss = supcon_loss(x, labels, temperature=0.01, base_temperature=0.07)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == pytest.approx(loop_supcon(x, labels, temperature=0.01), rel=1e-5)


def test_bad_arguments():
    x = rand_features(4, 2, 3, seed=0)
    with pytest.raises(ValueError, match="batch, n_views, dim"):
        supcon_loss(x[:, 0])
    with pytest.raises(ValueError, match="labels or mask"):
        supcon_loss(x, torch.zeros(4), mask=torch.eye(4))
    with pytest.raises(ValueError, match="3 labels for a batch of 4"):
        supcon_loss(x, torch.zeros(3))
    with pytest.raises(ValueError, match="mask must be"):
        supcon_loss(x, mask=torch.eye(3))
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(contrast_mode="some")
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        SupConLoss(temperature=0.0)
    assert "contrast_mode='one'" in repr(SupConLoss(contrast_mode="one"))


def test_backward_under_autocast_and_retained_graph():
    x32 = rand_features(6, 2, 8, seed=12, dtype=torch.float32)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    xa = x32.clone().requires_grad_(True)
    supcon_loss(xa, labels).backward()
    xb = x32.clone().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = supcon_loss(xb, labels)
    loss.backward(retain_graph=True)
    assert torch.allclose(xb.grad, xa.grad, atol=1e-6)
    loss.backward()  # the saved softmax is not consumed by the first backward
    assert torch.allclose(xb.grad, 2 * xa.grad, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_matches_cpu_float32():
    x = rand_features(32, 2, 16, seed=13, dtype=torch.float32)
    labels = torch.arange(32) % 5
    want = supcon_loss(x, labels, contrast_mode="all")
    xc = x.cuda().requires_grad_(True)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        got = SupConLoss()(xc.half(), labels.cuda())
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(xc.grad).all()
    assert got.item() == pytest.approx(want.item(), abs=1e-3)  # fp16 rounding of the inputs only


def test_labels_need_no_unique_or_index_add(monkeypatch):
    """The label path uses neither ``torch.unique`` (a GPU sync every step: its output size depends on
    the data) nor ``index_add_`` (atomic adds: non-deterministic on CUDA); same value as the loops."""
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(10, 2, 8, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([5, 1, 5, 9, 1, 1, 7, 5, 9, 2])  # sparse ids, a singleton class

    def forbidden(*a, **k):
        raise AssertionError("called")

    monkeypatch.setattr(torch, "unique", forbidden)
    monkeypatch.setattr(torch.Tensor, "index_add_", forbidden)
    monkeypatch.setattr(torch.Tensor, "index_add", forbidden)
    got = supcon_loss(feats, labels, temperature=0.1, base_temperature=0.07)
    assert got.item() == pytest.approx(loop_supcon(feats, labels, temperature=0.1, base_temperature=0.07), abs=1e-10)
