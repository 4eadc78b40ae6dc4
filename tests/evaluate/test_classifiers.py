"""Classical classifiers on frozen vectors: fit/predict, val-only selection, safe save/load."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from common.config.schema import CLASSIFIER_NAMES
from common.errors import UserError
from common.evaluate.classifiers import (
    CLASSES_FILE,
    DIGESTS_FILE,
    fit_classifiers,
    fit_linear,
    load_classifiers,
    save_classifiers,
)


def clustered(n_per_class: int, n_classes: int = 4, dim: int = 16, spread: float = 0.35, seed: int = 0):
    """Digits-like: one Gaussian cluster per class, L2-normalised like the store's vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(y.size, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


@pytest.mark.parametrize("name", list(CLASSIFIER_NAMES))
def test_each_classifier_fits_and_predicts(name):
    X, y = clustered(30, seed=1)
    Xv, yv = clustered(10, seed=1)  # same centres (same seed), new noise draws below
    Xt, yt = clustered(12, seed=1)
    rng = np.random.default_rng(9)
    Xv = Xv + 0.01 * rng.normal(size=Xv.shape).astype(np.float32)
    fitted = fit_classifiers([name], X, y, Xv, yv, n_classes=5, epochs=15, lr=0.1, batch_size=32)
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

    fit = fit_linear(X, y, Xv, yv, 3, epochs=12, lr=0.02, batch_size=16, seed=0, on_epoch=hook)
    best_val = max(val_acc, key=lambda e: (val_acc[e], -e))  # first epoch with the best val accuracy
    best_test = max(test_acc, key=lambda e: (test_acc[e], -e))
    assert best_val != best_test, "the data must make val and test disagree for this test to mean anything"
    assert fit.best_epoch == best_val
    for k, v in fit.head.state_dict().items():
        torch.testing.assert_close(v, snapshots[best_val][k])
    assert [h["val_accuracy"] for h in fit.history] == pytest.approx([val_acc[e] for e in sorted(val_acc)])


def test_linear_without_val_keeps_last_epoch():
    X, y = clustered(10, n_classes=2, dim=4)
    fit = fit_linear(X, y, X[:0], y[:0], 2, epochs=3, lr=0.1, batch_size=8)
    assert fit.best_epoch == 3


def test_save_load_round_trip_and_sha256_check(tmp_path):
    X, y = clustered(15, n_classes=3, dim=6, seed=4)
    fitted = fit_classifiers(["linear", "logreg"], X, y, X, y, n_classes=3, epochs=3, lr=0.1, batch_size=16)
    folder = tmp_path / "classifiers"
    classes = ["a", "b", "c"]
    paths = save_classifiers(fitted, folder, classes, model_id="m1", dim=6)
    assert paths["linear"].name == "linear.safetensors" and paths["logreg"].name == "logreg.skops"
    from safetensors.torch import load_file
    assert set(load_file(str(paths["linear"]))) == {"mean", "std", "fc.weight", "fc.bias"}  # tensors only
    digests = json.loads((folder / "sha256.json").read_text())
    assert set(digests) == {"linear.safetensors", "logreg.skops"}
    loaded = load_classifiers(folder, classes, "m1", 6)
    for name in fitted:
        np.testing.assert_allclose(loaded[name].scores(X), fitted[name].scores(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="another model"):
        load_classifiers(folder, classes, "other-model", 6)
    with pytest.raises(UserError, match="other classes"):
        load_classifiers(folder, ["a", "b", "x"], "m1", 6)
    with open(paths["logreg"], "ab") as fh:  # damaged after it was written
        fh.write(b"\0")
    with pytest.raises(UserError, match="sha256"):
        load_classifiers(folder, classes, "m1", 6)


def test_random_forest_round_trips_through_skops(tmp_path):
    X, y = clustered(10, n_classes=3, dim=4, seed=5)
    fitted = fit_classifiers(["random_forest", "svm"], X, y, X, y, n_classes=3, epochs=1, lr=0.1, batch_size=8)
    save_classifiers(fitted, tmp_path, ["a", "b", "c"], model_id="m", dim=4)
    loaded = load_classifiers(tmp_path, ["a", "b", "c"], "m", 4)
    for name in fitted:
        np.testing.assert_allclose(loaded[name].scores(X), fitted[name].scores(X))


class Planted:
    """A pickle payload: unpickling it creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _saved(tmp_path, names=("linear", "logreg")):
    X, y = clustered(12, n_classes=3, dim=5, seed=6)
    fitted = fit_classifiers(list(names), X, y, X, y, n_classes=3, epochs=2, lr=0.1, batch_size=16)
    folder = tmp_path / "classifiers"
    return save_classifiers(fitted, folder, ["a", "b", "c"], model_id="m", dim=5), folder


def _replace(folder, path, data: bytes, rename_to: str | None = None):
    """Put ``data`` in place of a saved file and make sha256.json (and classes.json) agree."""
    target = folder / (rename_to or path.name)
    if rename_to:
        path.unlink()
        meta = json.loads((folder / CLASSES_FILE).read_text())
        for rec in meta["classifiers"].values():
            if rec["file"] == path.name:
                rec["file"] = rename_to
        (folder / CLASSES_FILE).write_text(json.dumps(meta))
    target.write_bytes(data)
    digests = json.loads((folder / DIGESTS_FILE).read_text())
    digests.pop(path.name, None)
    digests[target.name] = hashlib.sha256(data).hexdigest()
    (folder / DIGESTS_FILE).write_text(json.dumps(digests))


@pytest.mark.parametrize("victim, rename_to", [("logreg", None), ("linear", None), ("logreg", "logreg.joblib")])
def test_planted_pickle_is_refused_and_never_run(tmp_path, victim, rename_to):
    import joblib

    paths, folder = _saved(tmp_path)
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.joblib"
    joblib.dump(Planted(str(marker)), payload)
    assert b"pwned" in payload.read_bytes()
    _replace(folder, paths[victim], payload.read_bytes(), rename_to)
    with pytest.raises(UserError) as e:
        load_classifiers(folder, ["a", "b", "c"], "m", 5)
    msg = str(e.value)
    assert "\n" not in msg and "refusing to load" in msg and "evaluate mode" in msg and str(folder) in msg
    assert not marker.exists(), "the planted pickle ran"
    pickle.loads(pickle.dumps(Planted(str(marker))))  # the payload is live: unpickling it does create the marker
    assert marker.exists()


def test_skops_file_with_an_untrusted_type_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    paths, folder = _saved(tmp_path, ("logreg",))
    evil = tmp_path / "evil.skops"
    sio.dump(Pipeline([("run", FunctionTransformer(os.system))]), evil)
    assert sio.get_untrusted_types(file=evil)  # skops itself does not trust it
    _replace(folder, paths["logreg"], evil.read_bytes())
    with pytest.raises(UserError, match=r"logreg\.skops: it names types that are not trusted \(.*system"):
        load_classifiers(folder, ["a", "b", "c"], "m", 5)


def test_skops_file_with_another_model_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import StandardScaler

    paths, folder = _saved(tmp_path, ("logreg",))
    other = tmp_path / "other.skops"
    sio.dump(StandardScaler().fit(np.ones((3, 5))), other)  # trusted by skops, but not a logreg pipeline
    _replace(folder, paths["logreg"], other.read_bytes())
    with pytest.raises(UserError, match="StandardScaler, not the logreg model"):
        load_classifiers(folder, ["a", "b", "c"], "m", 5)
