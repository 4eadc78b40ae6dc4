"""Classical classifiers on the frozen backbone's stored vectors, for comparison with retrieval.

Stage 07 fits, on the feature store's train vectors (the same frozen backbone the gallery comes
from), any of:

- ``linear``: one linear layer trained with cross-entropy by mini-batch SGD, as the reference
  SupCon code's linear evaluation (HobbitLong/SupContrast ``main_linear.py``: SGD, momentum 0.9,
  no weight decay, batch 256, lr 0.1, 100 epochs); here on stored vectors (no augmentation) with a
  cosine schedule. The inputs are standardised with the train mean and std first (MAE's linear
  probe puts a BatchNorm without affine before its head for the same reason: unit-norm features
  are tiny and badly scaled for SGD). The epoch kept is the one with the best **validation**
  accuracy (ties: the earliest); the test split is never seen while fitting or selecting.
- ``logreg``: scikit-learn ``LogisticRegression`` on standardised vectors, ``class_weight="balanced"``.
- ``svm``: scikit-learn ``LinearSVC`` on standardised vectors, ``class_weight="balanced"``.
- ``random_forest``: scikit-learn ``RandomForestClassifier``, ``class_weight="balanced"``, all cores.

Saved under ``07_inference/classifiers/``: ``linear.safetensors`` (the linear head's tensors),
``<name>.skops`` for the scikit-learn models (``skops.io``: a zip of JSON and arrays, no pickle),
``classes.json`` (class list, model id, dimension) and ``sha256.json`` (digest of every file).
Nothing loaded from a run folder can run code: safetensors holds tensors only, and a skops file is
refused unless every type it names is trusted by skops or in ``SKOPS_TRUSTED`` (checked with
``skops.io.get_untrusted_types`` before loading) and the loaded model has the type that
``make_sklearn`` builds. The digests only catch files changed or damaged since they were written
(anyone who can change a file can change ``sha256.json`` too): they are not what makes loading safe.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config.schema import CLASSIFIER_NAMES
from ..errors import NonFiniteLossError, UserError
from ..fileio import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)


# Fixed choices of the references (not knobs): SupContrast main_linear.py's optimiser, and
# scikit-learn's defaults except an iteration budget large enough for 87 classes to converge.
LINEAR_MOMENTUM = 0.9  # SupContrast main_linear.py
LINEAR_WEIGHT_DECAY = 0.0  # SupContrast main_linear.py
LINEAR_BATCH_SIZE = 256  # SupContrast main_linear.py (not inference.batch_size: that one only sets speed)
LOGREG_MAX_ITER = 1000  # lbfgs iterations (sklearn's default of 100 stops early on 87 classes)
SVM_MAX_ITER = 5000  # liblinear iterations (sklearn default 1000 warns on 2048-d features)
RF_TREES = 200  # trees in the random forest
STD_FLOOR = 1e-6  # standardisation: a feature with a smaller std is divided by this instead
LINEAR_FILE = "linear.safetensors"
SKOPS_SUFFIX = ".skops"
CLASSES_FILE = "classes.json"
DIGESTS_FILE = "sha256.json"  # integrity against damage, not a security check (see the module docstring)
# Types beyond skops' defaults (scikit-learn estimators, numpy) that the saved models may hold:
# the random forest's fitted trees. Anything else named by a skops file is refused.
SKOPS_TRUSTED = ("sklearn.tree._tree.Tree",)


# ----------------------------------------------------------------------------- linear head


class LinearHead(nn.Module):
    """Standardise with fixed train statistics, then one linear layer: ``(B, D) -> (B, C)`` logits."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - self.mean) / self.std)


@dataclass
class LinearFit:
    """The chosen linear head and how it was chosen."""

    head: LinearHead
    best_epoch: int  # 1-based epoch whose weights were kept
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, lr, val_accuracy


def _accuracy(head: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    head.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, X.shape[0], batch):
            correct += int((head(X[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return correct / max(1, X.shape[0])


def _train_epoch(head: LinearHead, opt: torch.optim.Optimizer, sched: Any, loss_fn: nn.Module, Xt: torch.Tensor,
                 yt: torch.Tensor, gen: torch.Generator, batch_size: int, epoch: int) -> tuple[torch.Tensor, int]:
    """One epoch of the linear head over the train vectors in a random order (``gen``): the summed
    loss (on the device: no sync per step) and the rows seen."""
    head.train()
    perm = torch.randperm(Xt.shape[0], generator=gen).to(Xt.device)
    total = torch.zeros((), device=Xt.device)
    n = 0
    for s in range(0, Xt.shape[0], batch_size):
        b = perm[s:s + batch_size]
        loss = loss_fn(head(Xt[b]), yt[b])  # (B, C) logits vs (B,) labels
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"linear head: non-finite loss at epoch {epoch} (lower inference.linear_lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * b.numel()
        n += b.numel()
    return total, n


def fit_linear(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
               n_classes: int, epochs: int, lr: float, batch_size: int, device: torch.device | str = "cpu",
               seed: int = 0, on_epoch: Callable[[int, LinearHead, float], None] | None = None) -> LinearFit:
    """Train a linear head on frozen vectors with cross-entropy; keep the best-validation epoch.

    ``on_epoch(epoch, head, val_accuracy)`` is called after every epoch (progress, tests). With an
    empty validation split the last epoch is kept (logged as a warning).
    """
    if epochs < 1:
        raise UserError(f"inference.linear_epochs: must be >= 1, got {epochs}")
    if lr <= 0:
        raise UserError(f"inference.linear_lr: must be > 0, got {lr}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.as_tensor(np.ascontiguousarray(X_train, dtype=np.float32)).to(device)
    yt = torch.as_tensor(np.asarray(y_train, dtype=np.int64)).to(device)
    Xv = torch.as_tensor(np.ascontiguousarray(X_val, dtype=np.float32)).to(device)
    yv = torch.as_tensor(np.asarray(y_val, dtype=np.int64)).to(device)
    dim = Xt.shape[1]
    torch.manual_seed(seed)  # the layer's initialisation
    head = LinearHead(dim, n_classes).to(device)
    head.mean.copy_(Xt.mean(0))
    head.std.copy_(Xt.std(0, unbiased=False).clamp_min(STD_FLOOR))
    opt = torch.optim.SGD(head.fc.parameters(), lr=lr, momentum=LINEAR_MOMENTUM, weight_decay=LINEAR_WEIGHT_DECAY)
    steps_per_epoch = math.ceil(Xt.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    use_val = Xv.shape[0] > 0
    if not use_val:
        log.warning("linear head: the validation split is empty; keeping the last epoch (no selection)")
    best_state: dict[str, torch.Tensor] | None = None
    best_acc, best_epoch = -1.0, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        total, n = _train_epoch(head, opt, sched, loss_fn, Xt, yt, gen, batch_size, epoch)
        val_acc = _accuracy(head, Xv, yv, batch_size) if use_val else float("nan")
        history.append({"epoch": epoch, "loss": float(total) / max(n, 1), "val_accuracy": val_acc,
                        "lr": opt.param_groups[0]["lr"]})
        if on_epoch is not None:
            on_epoch(epoch, head, val_acc)
        if (use_val and val_acc > best_acc) or not use_val:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(head.state_dict())
    assert best_state is not None
    head.load_state_dict(best_state)
    head.eval()
    log.info("linear head: best validation accuracy %.4f at epoch %d of %d", best_acc, best_epoch, epochs)
    return LinearFit(head=head.cpu(), best_epoch=best_epoch, best_val_accuracy=best_acc, history=history)


# ----------------------------------------------------------------------------- scikit-learn models


def make_sklearn(name: str, seed: int) -> Any:
    """An unfitted scikit-learn estimator for ``logreg``, ``svm`` or ``random_forest``."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=LOGREG_MAX_ITER,
                                                                  random_state=seed))
    if name == "svm":
        return make_pipeline(StandardScaler(), LinearSVC(class_weight="balanced", max_iter=SVM_MAX_ITER,
                                                         random_state=seed))
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=RF_TREES, class_weight="balanced", n_jobs=-1, random_state=seed)
    raise UserError(f"inference.classifiers: unknown classifier {name!r} (choose from {list(CLASSIFIER_NAMES)})")


# ----------------------------------------------------------------------------- a fitted classifier


@dataclass
class Fitted:
    """One fitted classifier: ``scores(X) -> (N, C)``, higher is more likely; -inf for unseen classes."""

    name: str
    model: Any  # LinearHead or a scikit-learn estimator
    n_classes: int
    fit_time_s: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)

    def scores(self, X: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if isinstance(self.model, nn.Module):
            out = []
            with torch.no_grad():
                for s in range(0, X.shape[0], batch_size):
                    out.append(self.model(torch.from_numpy(X[s:s + batch_size])).float().numpy())
            return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)
        est = self.model
        if hasattr(est, "predict_proba"):
            raw = est.predict_proba(X)
        else:
            raw = est.decision_function(X)
            if raw.ndim == 1:  # binary: sklearn's one score is for classes_[1]
                raw = np.stack([-raw, raw], axis=1)
        full = np.full((X.shape[0], self.n_classes), -np.inf, dtype=np.float64)
        full[:, np.asarray(est.classes_, dtype=np.int64)] = raw  # classes absent from train never win
        return full

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted labels (N,), ranked candidate labels (N, C)); argmax ties go to the lower index."""
        sc = self.scores(X)
        ranked = np.argsort(-sc, axis=1, kind="stable")
        return ranked[:, 0].astype(np.int64), ranked.astype(np.int64)


def fit_classifiers(names: Sequence[str], X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray,
                    y_val: np.ndarray, n_classes: int, *, epochs: int, lr: float, batch_size: int,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Fitted]:
    """Fit each named classifier on the train vectors (the linear head selects its epoch on val).

    The signature takes no test data on purpose: selection can only ever see validation.
    """
    out: dict[str, Fitted] = {}
    y_train = np.asarray(y_train, dtype=np.int64)
    for name in names:
        t0 = time.perf_counter()
        if name == "linear":
            fit = fit_linear(X_train, y_train, X_val, y_val, n_classes, epochs, lr, batch_size, device, seed)
            out[name] = Fitted(name, fit.head, n_classes, time.perf_counter() - t0,
                               {"best_epoch": fit.best_epoch, "best_val_accuracy": fit.best_val_accuracy,
                                "selected_on": "val", "history": fit.history})
            continue
        est = make_sklearn(name, seed)
        if np.unique(y_train).size < 2:
            raise UserError(f"inference.classifiers: {name} needs at least two classes in the train split")
        est.fit(np.ascontiguousarray(X_train, dtype=np.float32), y_train)
        out[name] = Fitted(name, est, n_classes, time.perf_counter() - t0, {})
        log.info("%s fitted in %.1f s", name, out[name].fit_time_s)
    return out


# ----------------------------------------------------------------------------- save and load


def model_file(name: str) -> str:
    """The file name a classifier is saved under: ``linear.safetensors`` or ``<name>.skops``."""
    if name not in CLASSIFIER_NAMES:
        raise UserError(f"inference.classifiers: unknown classifier {name!r} (choose from {list(CLASSIFIER_NAMES)})")
    return LINEAR_FILE if name == "linear" else f"{name}{SKOPS_SUFFIX}"


def save_classifiers(fitted: dict[str, Fitted], folder: Path, classes: Sequence[str],
                     model_id: Any, dim: int) -> dict[str, Path]:
    """Write every fitted classifier under ``folder`` (atomically) plus classes.json and sha256.json.

    The linear head goes to safetensors, the scikit-learn models to skops (never a pickle).
    Returns name -> file path. The file sizes are the "model size" of the comparison table.
    """
    import skops.io as sio
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, f in fitted.items():
        p = folder / model_file(name)
        with atomic_path(p) as tmp:
            if name == "linear":
                save_file({k: v.detach().cpu().contiguous() for k, v in f.model.state_dict().items()}, str(tmp))
            else:
                sio.dump(f.model, tmp)
        paths[name] = p
    write_json(folder / CLASSES_FILE, {"classes": list(classes), "model_id": model_id, "dim": int(dim),
                                       "classifiers": {n: {"file": p.name, "info": {k: v for k, v in fitted[n].info.items()
                                                                                    if k != "history"}}
                                                       for n, p in paths.items()}})
    write_json(folder / DIGESTS_FILE, {p.name: sha256_file(p) for p in paths.values()})
    return paths


def _refused(p: Path, why: str) -> UserError:
    return UserError(f"{p}: {why}; refusing to load it: delete the folder {p.parent} and rerun "
                     "07_inference.py in evaluate mode")


def _load_linear(p: Path, dim: int, n_classes: int) -> LinearHead:
    """The linear head from a safetensors file (tensors only: nothing in it can run code)."""
    from safetensors.torch import load_file

    head = LinearHead(int(dim), n_classes)
    try:
        head.load_state_dict(load_file(str(p), device="cpu"))
    except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file is the same user error
        raise _refused(p, f"not the saved linear head ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    return head.eval()


def _structure(est: Any) -> list[type]:
    """The estimator's type, then its steps' types for a Pipeline."""
    return [type(est), *(type(step) for _, step in getattr(est, "steps", []))]


def _check_skops_types(p: Path) -> None:
    """Refuse a file that is not a skops file or names a type that is not trusted (nothing loaded)."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=p)
    except Exception as e:  # noqa: BLE001 - a pickle, a damaged zip, a foreign file
        raise _refused(p, f"not a skops file ({e.__class__.__name__})") from None
    unexpected = sorted(set(untrusted) - set(SKOPS_TRUSTED))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise _refused(p, f"it names types that are not trusted ({shown})")


def _load_sklearn(p: Path, name: str) -> Any:
    """A scikit-learn model from a skops file, refused unless every type in it is trusted."""
    import skops.io as sio

    _check_skops_types(p)
    try:
        model = sio.load(p, trusted=list(SKOPS_TRUSTED))
    except Exception as e:  # noqa: BLE001 - skops refuses or cannot rebuild something
        raise _refused(p, f"skops cannot load it ({e.__class__.__name__})") from None
    if _structure(model) != _structure(make_sklearn(name, 0)):
        raise _refused(p, f"it holds a {type(model).__name__}, not the {name} model")
    return model


def _saved_files(folder: Path, classes: Sequence[str], model_id: Any, dim: int,
                 names: Sequence[str] | None) -> list[tuple[str, Path, dict]]:
    """(name, file, record) of each saved classifier asked for, after checking ``classes.json``
    against the classes and model, and every file against its sha256 (``UserError`` otherwise)."""
    meta_p, dig_p = folder / CLASSES_FILE, folder / DIGESTS_FILE
    if not meta_p.is_file() or not dig_p.is_file():
        raise UserError(f"{folder} holds no saved classifiers ({CLASSES_FILE}, {DIGESTS_FILE} missing): "
                        "run 07_inference.py in evaluate mode first")
    meta, digests = read_json(meta_p), read_json(dig_p)
    if list(meta.get("classes", [])) != list(classes):
        raise UserError(f"{meta_p}: the classifiers were fitted for other classes than the feature store's")
    if meta.get("model_id") != model_id or int(meta.get("dim", -1)) != int(dim):
        raise UserError(f"{meta_p}: the classifiers were fitted on another model's vectors "
                        f"(model {meta.get('model_id')!r}, not {model_id!r}): rerun 07_inference.py in evaluate mode")
    out = []
    for name, rec in meta.get("classifiers", {}).items():
        if names is not None and name not in names:
            continue
        file = rec.get("file") if isinstance(rec, dict) else None
        expected = model_file(name) if name in CLASSIFIER_NAMES else None
        if expected is None or file != expected:
            raise _refused(meta_p, f"it lists classifier {str(name)[:40]!r} in file {str(file)[:60]!r}, "
                           f"not {expected or 'a known classifier'} (an older, unsafe format?)")
        p = folder / expected
        if not p.is_file():
            raise UserError(f"{p} is missing: rerun 07_inference.py in evaluate mode")
        want = digests.get(p.name)
        if want is None or sha256_file(p) != want:
            raise _refused(p, f"its sha256 differs from {dig_p.name} (changed since it was saved)")
        out.append((name, p, rec))
    return out


def check_saved_classifiers(folder: Path, classes: Sequence[str], model_id: Any, dim: int,
                            names: Sequence[str] | None = None) -> None:
    """What ``load_classifiers`` refuses that can be seen without building a model: the files,
    their sha256, the classes and model they were fitted for, and the types a skops file names."""
    for name, p, _ in _saved_files(folder, classes, model_id, dim, names):
        if name != "linear":
            _check_skops_types(p)


def load_classifiers(folder: Path, classes: Sequence[str], model_id: Any, dim: int,
                     names: Sequence[str] | None = None) -> dict[str, Fitted]:
    """Load the classifiers saved by ``save_classifiers``, checking files, sha256, classes and model.

    Nothing is unpickled: the linear head is read from safetensors, the scikit-learn models from
    skops files whose types are all trusted. Raises ``UserError`` naming the file when a file is
    missing, not in the expected format (e.g. an older ``.joblib`` pickle), holds an untrusted
    type or differs from its digest, or when the classifiers were fitted for other classes or
    another model's vectors.
    """
    out: dict[str, Fitted] = {}
    for name, p, rec in _saved_files(folder, classes, model_id, dim, names):
        model: Any = _load_linear(p, dim, len(classes)) if name == "linear" else _load_sklearn(p, name)
        out[name] = Fitted(name, model, len(classes), float("nan"), dict(rec.get("info", {})))
    return out


def _same_classes(classes_json: Path, classes: list[str], quiet: bool = False) -> bool:
    """Whether the evaluation's classifiers know the gallery's classes (gallery-only classes added
    since, or classes held out, mean fitting them again here rather than refusing)."""
    try:
        same = list(read_json(classes_json).get("classes", [])) == list(classes)
    except (OSError, ValueError, AttributeError):
        return True  # let load_classifiers say what is wrong with the file
    if not same and not quiet:
        log.info("the evaluation's classifiers (%s) were fitted for other classes: fitting them again", classes_json)
    return same
