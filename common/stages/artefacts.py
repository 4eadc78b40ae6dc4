"""What one stage writes and another reads: the artefact names, declared once, and their shared readers.

A driver never imports another driver: the names of the files a stage leaves for the next ones,
and the readers more than one stage uses (stage 04's ``model.json`` and store, the checkpoint
``extract.checkpoint`` names, stage 05's ``threshold.json``), live here. The stage table
(``common.stages``) imports nothing from this module.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import UserError
from ..fileio import read_json
from . import TRAIN

if TYPE_CHECKING:
    from ..store.containers import ModelInfo, Vectors
    from ..store.postgres import PgStore
    from ..store.sqlite import FeatureStore

log = logging.getLogger(__name__)

SPLITS_CSV = "splits.csv"  # 01: every usable image with its class and split
STATS_JSON = "stats.json"  # 02: the mean and std of the train split
CHECKPOINTS_DIR = "checkpoints"  # 03: best.pt, last.pt, epoch_*.pt
STORE_FILE = "features.sqlite"  # 04: the feature store (when store.url is not set)
MODEL_JSON = "model.json"  # 04: the model and embedding the store holds, and where the store is
THRESHOLD_JSON = "threshold.json"  # 05: the chosen threshold
SWEEP_PNG = "threshold_sweep.png"  # 05: the sweep's figure (stage 07's report shows it)
LUT_FILE = "lut.sqlite"  # 06: the pruned gallery, a self-contained store
LUT_JSON = "lut.json"  # 06: what the LUT holds
INDEX_FILE = "lut.faiss"  # 06: the FAISS index over the LUT's rows (search.index != exact)
INDEX_JSON = "lut_faiss.json"  # 06: what that index indexes
CLASSIFIERS_DIR = "classifiers"  # 07: the classical classifiers the evaluation fitted


def resolve_checkpoint(stage03_dir: Path | None, spec: str, run_dir: Path | None = None) -> Path:
    """``extract.checkpoint`` as a file: ``best``/``last`` -> 03_main_supcon/checkpoints/<name>.pt."""
    if spec in ("best", "last"):
        if stage03_dir is None:
            raise UserError(f"extract.checkpoint={spec} needs {TRAIN}: run {TRAIN}.py")
        p = Path(stage03_dir) / CHECKPOINTS_DIR / f"{spec}.pt"
    else:
        p = Path(spec).expanduser()
    if not p.is_file():
        where = f" --run {run_dir}" if run_dir is not None else ""
        raise UserError(f"checkpoint {p} (extract.checkpoint={spec}) is missing: run {TRAIN}.py{where}")
    return p


def read_model_json(stage04_dir: Path) -> dict[str, Any]:
    """Stage 04's ``model.json`` (``UserError`` naming the stage to rerun when unreadable)."""
    p = Path(stage04_dir) / MODEL_JSON
    try:
        d = read_json(p)
        int(d["model_id"]), str(d["checkpoint_sha256"])  # noqa: B018 - the keys every reader needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p} is unreadable ({e.__class__.__name__}): rerun 04_extract_features.py --force") from None
    return d


def store_of(stage04_dir: Path, password_env: str | None = None) -> Path | PgStore:
    """The store stage 04 wrote: its ``features.sqlite``, or the PostgreSQL schema ``model.json``
    names (the password from ``password_env``, ``store.password_env``; None: the recorded one)."""
    from ..store.postgres import PgStore  # here: stages 01-03 import this module's names, not the store

    rec = read_model_json(stage04_dir).get("store")
    try:
        pg = PgStore.from_record(rec, password_env)
    except UserError as e:
        raise UserError(f"{Path(stage04_dir) / MODEL_JSON}: its store record is unusable ({e}): rerun "
                        "04_extract_features.py --force") from None
    return Path(stage04_dir) / STORE_FILE if pg is None else pg


def require_same_checkpoint(query_model: Any, gallery_model: Any, what: str) -> None:
    """Refuse to match vectors of one checkpoint against a gallery of another (``UserError``)."""
    if query_model != gallery_model:
        raise UserError(f"{what} were embedded by another checkpoint ({query_model!r}) than the gallery "
                        f"({gallery_model!r}): rerun 04_extract_features.py and 06_prune_features.py")


@dataclass
class ModelStore:
    """Stage 04's store, open, and the one model its ``model.json`` describes (``open_model_store``)."""

    meta: dict[str, Any]  # model.json
    target: Path | PgStore
    store: FeatureStore
    info: ModelInfo

    def load(self, splits: Sequence[str], classes: Sequence[str], max_memory_gib: float | None = None) -> Vectors:
        """The vectors of ``splits`` merged by image id (labels indexed in ``classes``); above
        ``max_memory_gib`` of vectors (None: never) they stay in the store (``common.streaming``)."""
        from ..retrieval.gallery import vectors_of

        return vectors_of(self.store, self.target, tuple(splits), self.info, list(classes), max_memory_gib)


@contextlib.contextmanager
def open_model_store(stage04_dir: Path, password_env: str | None = None) -> Iterator[ModelStore]:
    """The one reader of stage 04's vectors (stages 05, 06 and 07): its store (``store_of``) open,
    the model ``model.json`` names complete in it and holding what ``model.json`` says (checkpoint
    sha256, dimension, dtype), else ``UserError`` naming the stage to rerun."""
    from ..store.maintenance import open_store

    meta = read_model_json(stage04_dir)
    target = store_of(stage04_dir, password_env)
    with open_store(target) as store:
        info = store.require_complete(int(meta["model_id"]))
        if (info.checkpoint_sha256 != meta["checkpoint_sha256"] or info.dim != int(meta.get("dim", info.dim))
                or info.dtype != meta.get("dtype", "float32")):  # a model.json before extract.dtype: float32
            raise UserError(f"{target} holds vectors of another checkpoint than {Path(stage04_dir) / MODEL_JSON} "
                            f"describes ({info.describe()}): rerun 04_extract_features.py --force")
        log.info("feature store %s: %s", target, info.describe())
        yield ModelStore(meta, target, store, info)


def open_lut(lut_path: Path, model: ModelInfo, classes: Sequence[str],
             max_memory_gib: float | None = None) -> tuple[Vectors, str]:
    """Stage 06's self-contained LUT (its train and gallery-only rows by image id: the order its
    FAISS index was built in), checked to be of the checkpoint and embedding of ``model``; and a
    line describing it."""
    from ..retrieval.gallery import vectors_of
    from ..retrieval.streamed import describe, is_streamed
    from ..store.schema import GALLERY_SPLITS
    from ..store.sqlite import FeatureStore

    with FeatureStore(lut_path) as lut:
        info = lut.current_model()
        require_same_checkpoint((info.checkpoint_sha256, info.embedding, info.dim),
                                (model.checkpoint_sha256, model.embedding, model.dim), f"the LUT {lut_path}'s vectors")
        gallery = vectors_of(lut, lut_path, GALLERY_SPLITS, info, list(classes), max_memory_gib)
    how = f", {describe(gallery.X)}" if is_streamed(gallery.X) else ""
    return gallery, f"LUT {lut_path} ({len(gallery)} vectors{how})"


def read_threshold_json(stage05_dir: Path, required: bool = True) -> dict[str, Any] | None:
    """Stage 05's ``threshold.json`` with its ``threshold`` checked a number. ``required``: an
    unreadable file is a ``UserError`` naming stage 05; else a missing file gives None and an
    unreadable one a warning and None (stage 07 only shows what it suggests)."""
    tj = Path(stage05_dir) / THRESHOLD_JSON
    if not required and not tj.is_file():
        return None
    try:
        meta = read_json(tj)
        float(meta["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        if required:
            raise UserError(f"{tj} is unreadable ({e}): rerun 05_lut_threshold.py") from None
        log.warning("cannot read %s: %s", tj, e)
        return None
    return meta
