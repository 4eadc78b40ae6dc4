"""Classical classifiers on frozen vectors: fit/predict, val-only selection, save/load with sha256."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common import classifiers as K
from common.errors import UserError


def clustered(n_per_class: int, n_classes: int = 4, dim: int = 16, spread: float = 0.35, seed: int = 0):
    """Digits-like: one Gaussian cluster per class, L2-normalised like the store's vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(y.size, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


@pytest.mark.parametrize("name", list(K.CLASSIFIERS))
def test_each_classifier_fits_and_predicts(name):
    X, y = clustered(30, seed=1)
    Xv, yv = clustered(10, seed=1)  # same centres (same seed), new noise draws below
    Xt, yt = clustered(12, seed=1)
    rng = np.random.default_rng(9)
    Xv = Xv + 0.01 * rng.normal(size=Xv.shape).astype(np.float32)
    fitted = K.fit_classifiers([name], X, y, Xv, yv, n_classes=5, epochs=15, lr=0.1, batch_size=32)
    f = fitted[name]
    pred, ranked = f.predict(Xt)
    assert pred.shape == (Xt.shape[0],) and ranked.shape == (Xt.shape[0], 5)
    assert (pred == ranked[:, 0]).all()
    assert (pred != 4).all()  # class 4 has no training vector: never predicted
    assert (pred == yt).mean() > 0.9
    assert f.fit_time_s > 0


def test_linear_selection_follows_val_not_test():
    # Overlapping clusters and a small learning rate: accuracy changes from epoch to epoch.
    X, y = clustered(40, n_classes=3, dim=8, spread=1.2, seed=2)
    Xv, yv = clustered(40, n_classes=3, dim=8, spread=1.2, seed=2)
    Xv = Xv[::-1].copy()  # new order; val labels agree with train
    yv = yv[::-1].copy()
    Xte = Xv.copy()
    yte = (yv + 1) % 3  # test contradicts val: the epoch a leak would pick is a different one
    snapshots, val_acc, test_acc = {}, {}, {}

    def hook(epoch, head, acc):
        with torch.no_grad():
            snapshots[epoch] = {k: v.clone() for k, v in head.state_dict().items()}
            val_acc[epoch] = float((head(torch.from_numpy(Xv)).argmax(1).numpy() == yv).mean())
            test_acc[epoch] = float((head(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
        assert acc == pytest.approx(val_acc[epoch])

    fit = K.fit_linear(X, y, Xv, yv, 3, epochs=12, lr=0.02, batch_size=16, seed=0, on_epoch=hook)
    best_val = max(val_acc, key=lambda e: (val_acc[e], -e))  # first epoch with the best val accuracy
    best_test = max(test_acc, key=lambda e: (test_acc[e], -e))
    assert best_val != best_test, "the data must make val and test disagree for this test to mean anything"
    assert fit.best_epoch == best_val
    for k, v in fit.head.state_dict().items():
        torch.testing.assert_close(v, snapshots[best_val][k])
    assert [h["val_accuracy"] for h in fit.history] == pytest.approx([val_acc[e] for e in sorted(val_acc)])


def test_linear_without_val_keeps_last_epoch():
    X, y = clustered(10, n_classes=2, dim=4)
    fit = K.fit_linear(X, y, X[:0], y[:0], 2, epochs=3, lr=0.1, batch_size=8)
    assert fit.best_epoch == 3


def test_save_load_round_trip_and_sha256_check(tmp_path):
    X, y = clustered(15, n_classes=3, dim=6, seed=4)
    fitted = K.fit_classifiers(["linear", "logreg"], X, y, X, y, n_classes=3, epochs=3, lr=0.1, batch_size=16)
    folder = tmp_path / "classifiers"
    classes = ["a", "b", "c"]
    paths = K.save_classifiers(fitted, folder, classes, model_id="m1", dim=6)
    assert paths["linear"].name == "linear.pt" and paths["logreg"].suffix == ".joblib"
    torch.load(paths["linear"], weights_only=True)  # a plain state dict
    digests = json.loads((folder / "sha256.json").read_text())
    assert set(digests) == {"linear.pt", "logreg.joblib"}
    loaded = K.load_classifiers(folder, classes, "m1", 6)
    for name in fitted:
        np.testing.assert_allclose(loaded[name].scores(X), fitted[name].scores(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="another model"):
        K.load_classifiers(folder, classes, "other-model", 6)
    with pytest.raises(UserError, match="other classes"):
        K.load_classifiers(folder, ["a", "b", "x"], "m1", 6)
    with open(paths["logreg"], "ab") as fh:  # tamper with the pickle
        fh.write(b"\0")
    with pytest.raises(UserError, match="sha256"):
        K.load_classifiers(folder, classes, "m1", 6)
