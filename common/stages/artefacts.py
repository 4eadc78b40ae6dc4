"""What one stage writes and another reads: the artefact names, declared once, and their shared readers.

A driver never imports another driver: the names of the files a stage leaves for the next ones,
and the readers more than one stage uses (stage 04's ``model.json`` and store, the checkpoint
``extract.checkpoint`` names, stage 05's ``threshold.json``), live here. The stage table
(``common.stages``) imports nothing from this module.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..fileio import read_json
from . import TRAIN

if TYPE_CHECKING:
    from ..features import PgStore

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


def store_of(stage04_dir: Path, cfg: Any) -> Path | PgStore:
    """The store stage 04 wrote: its ``features.sqlite``, or the PostgreSQL schema ``model.json``
    names (the password from ``store.password_env``)."""
    from ..features import PgStore  # here: stages 01-03 import this module's names, not the store

    rec = read_model_json(stage04_dir).get("store")
    try:
        pg = PgStore.from_record(rec, cfg.store.password_env)
    except UserError as e:
        raise UserError(f"{Path(stage04_dir) / MODEL_JSON}: its store record is unusable ({e}): rerun "
                        "04_extract_features.py --force") from None
    return Path(stage04_dir) / STORE_FILE if pg is None else pg


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
