"""The ``models`` table of a feature store: which checkpoint and preprocessing made its vectors,
and the checks that keep one checkpoint's vectors from being compared with another's.

``ModelTable`` is mixed into ``common.store.sqlite.FeatureStore`` (and so ``PgFeatureStore``); it
uses the store's ``path``, its transactions (``read_tx``, ``write_tx``), its dialect hooks
(``sql``) and ``decode`` / ``_insert_vectors`` (converting float32 vectors to float16).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from sqlalchemy import delete, insert, select, update

from ..data.fill import pad_fill_code
from ..errors import UserError
from .containers import ModelInfo, _model_from_row, _now
from .schema import DTYPES, EMBEDDINGS, NORM_TOLERANCE, READ_BLOCK_BYTES, STAGE, meta_t, models_t, raw_connection

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)


class ModelTable:
    """The model-table methods of a feature store (a mixin of ``FeatureStore``)."""

    def models(self) -> list[ModelInfo]:
        """Every model row, by id."""
        with self.read_tx() as conn:
            return [_model_from_row(r) for r in conn.execute(select(models_t).order_by(models_t.c.id))]

    def model_info(self, model_id: int) -> ModelInfo:
        """The model row ``model_id`` (``UserError`` when there is none)."""
        with self.read_tx() as conn:
            r = conn.execute(select(models_t).where(models_t.c.id == int(model_id))).first()
        if r is None:
            raise UserError(f"{self.path} holds no model {model_id}: rerun {STAGE}")
        return _model_from_row(r)

    def find_model(self, checkpoint_sha256: str, embedding: str) -> ModelInfo | None:
        """The model row of a checkpoint and embedding kind, complete or not; None when absent."""
        with self.read_tx() as conn:
            r = conn.execute(select(models_t).where(models_t.c.checkpoint_sha256 == checkpoint_sha256,
                                                    models_t.c.embedding == embedding)).first()
        return None if r is None else _model_from_row(r)

    def register_model(self, *, checkpoint_sha256: str, embedding: str, backbone: str, dim: int,
                       mean: Sequence[float], std: Sequence[float], image_size: int, pad_fill: int,
                       classes: Sequence[str], checkpoint_path: str, epoch: int | None = None,
                       dtype: str = "float32", replace_others: bool = True) -> tuple[ModelInfo, list[ModelInfo]]:
        """The model row for these settings, created (incomplete) when absent; one transaction.

        ``dtype``: how its vectors are stored, ``float32`` or ``float16`` (``extract.dtype``).
        An existing row of the same checkpoint and embedding whose preprocessing or dtype differs
        (other stats, image size, pad fill, float16 instead of float32) is dropped with its
        vectors and recreated; when only the dtype differs, the old model is complete and float32
        and the new one float16, its vectors are converted into the new model in the same
        transaction instead (``_convert_vectors``: what embedding again would store, without
        embedding: float16 is float32 rounded). With
        ``replace_others`` every other model (another checkpoint or embedding) is deleted with its
        vectors in the same transaction: the store then holds one model's vectors.
        Returns (the model, the models dropped).
        """
        values = _model_values(checkpoint_sha256, embedding, backbone, dim, mean, std, image_size, pad_fill, classes,
                               checkpoint_path, epoch, dtype)
        with self.write_tx() as conn:
            rows = [_model_from_row(r) for r in conn.execute(select(models_t).order_by(models_t.c.id))]
            wanted = ModelInfo(id=-1, **{**values, "mean": json.loads(values["mean"]),
                                         "std": json.loads(values["std"]), "classes": list(classes),
                                         "complete": False})
            keep, dropped, source = _plan_models(rows, wanted, replace_others)
            if source is not None:  # its key is free for the new row while its vectors are converted
                conn.execute(update(models_t).where(models_t.c.id == source.id)
                             .values(checkpoint_sha256=f"{source.checkpoint_sha256}:converting"))
            else:
                self._drop_models(conn, dropped)
            if keep is None:
                new_id = conn.execute(insert(models_t).values(**values)).inserted_primary_key[0]
                self._set_status(conn, int(new_id), "extracting")
                if source is not None:
                    n = self._convert_vectors(conn, source, int(new_id), dtype)
                    self._drop_models(conn, dropped)
                    log.info("converted the %d float32 vectors of %s to %s in place: no image embedded again", n,
                             source.describe(), dtype)
            else:
                new_id = keep.id
                if keep.checkpoint_path != str(checkpoint_path) or keep.epoch != epoch:
                    conn.execute(update(models_t).where(models_t.c.id == keep.id)
                                 .values(checkpoint_path=str(checkpoint_path), epoch=epoch))
            info = _model_from_row(conn.execute(select(models_t).where(models_t.c.id == new_id)).one())
        for m in dropped:
            log.info("dropped %s with its vectors (replaced by %s)", m.describe(), info.describe())
        return info, dropped

    def _drop_models(self, conn: Connection, models: Sequence[ModelInfo]) -> None:
        for m in models:
            conn.execute(delete(models_t).where(models_t.c.id == m.id))  # cascades to vectors
            conn.execute(delete(meta_t).where(meta_t.c.key == f"model.{m.id}.status"))

    def _convert_vectors(self, conn: Connection, source: ModelInfo, model_id: int, dtype: str) -> int:
        """Copy every vector of ``source`` into ``model_id`` as ``dtype``, in ``conn``'s
        transaction, a block of rows at a time (keyset: each block is read whole before it is
        written). Every vector is checked on read and again, rounded, on write. Returns the count."""
        block = max(1, READ_BLOCK_BYTES // (source.itemsize * source.dim))
        sql = self.sql("SELECT image_id, vector FROM vectors WHERE model_id = ? AND image_id > ? "
                      "ORDER BY image_id LIMIT ?")
        last, n = -1, 0
        while rows := raw_connection(conn).execute(sql, (source.id, last, block)).fetchall():
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            X = self.decode([r[1] for r in rows], ids, source.dim, None, source.dtype)
            S = np.ascontiguousarray(X, dtype=DTYPES[dtype])
            norms = np.sqrt(np.einsum("ij,ij->i", S, S, dtype=np.float64))
            if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > NORM_TOLERANCE:
                raise ValueError(f"vectors of {source.describe()} are not unit-norm once stored as {dtype}")
            n += self._insert_vectors(conn, model_id, ids, S)
            last = int(ids[-1])
        return n

    def _set_status(self, conn: Connection, model_id: int, status: str) -> None:
        raw_connection(conn).execute(self.sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                           (f"model.{model_id}.status", status))

    def _set_complete(self, conn: Connection, model_id: int | None, complete: bool) -> None:
        """Set ``complete`` of one model (or of every model when None) and its meta status."""
        q = update(models_t).values(complete=int(complete))
        if model_id is not None:
            q = q.where(models_t.c.id == model_id)
        conn.execute(q)
        ids = [model_id] if model_id is not None else [r[0] for r in conn.execute(select(models_t.c.id))]
        for i in ids:
            self._set_status(conn, int(i), "complete" if complete else "extracting")

    def require_complete(self, model_id: int) -> ModelInfo:
        """The model row, checked complete: else ``UserError`` saying to rerun stage 04."""
        info = self.model_info(model_id)
        if not info.complete:
            raise UserError(f"{self.path}: the vectors of {info.describe()} are incomplete (an interrupted or "
                            f"unfinished extraction): rerun {STAGE}")
        return info

    def current_model(self, embedding: str | None = None) -> ModelInfo:
        """The most recent complete model (of one embedding kind, when given)."""
        cands = [m for m in self.models() if embedding is None or m.embedding == embedding]
        done = [m for m in cands if m.complete]
        if not done:
            why = "only incomplete vectors (an interrupted extraction)" if cands else "no vectors"
            raise UserError(f"{self.path} holds {why}{'' if embedding is None else f' of the {embedding} embedding'}: "
                            f"rerun {STAGE}")
        return done[-1]

    def require_model(self, checkpoint_sha256: str, embedding: str, dim: int | None = None) -> ModelInfo:
        """The complete model of a checkpoint and embedding, with dimension ``dim`` when given.

        ``UserError`` naming the checkpoint and dimension asked for and those the store holds
        when they differ (queries must be embedded by the gallery's own checkpoint).
        """
        m = self.find_model(checkpoint_sha256, embedding)
        asked = f"checkpoint sha256 {checkpoint_sha256[:12]} ({embedding} embedding{'' if dim is None else f', dim {dim}'})"
        if m is None:
            held = "; ".join(x.describe() for x in self.models()) or "no vectors"
            raise UserError(f"{self.path} holds {held}, not vectors of {asked}: vectors of different checkpoints "
                            f"cannot be compared: rerun {STAGE} with that checkpoint")
        if dim is not None and int(dim) != m.dim:
            raise UserError(f"{self.path}: {m.describe()} has dim {m.dim}, but {asked} gives dim {dim}: "
                            f"rerun {STAGE}")
        return self.require_complete(m.id)

    def check_same_model(self, model_id_a: int, model_id_b: int) -> ModelInfo:
        """``UserError`` naming both models when two sets of vectors come from different models."""
        a = self.model_info(model_id_a)
        if int(model_id_a) == int(model_id_b):
            return a
        b = self.model_info(model_id_b)
        raise UserError(f"vectors of {a.describe()} cannot be compared with vectors of {b.describe()} "
                        f"in {self.path}: embed both with one checkpoint ({STAGE})")


def _model_values(checkpoint_sha256: str, embedding: str, backbone: str, dim: int, mean: Sequence[float],
                  std: Sequence[float], image_size: int, pad_fill: int, classes: Sequence[str], checkpoint_path: str,
                  epoch: int | None, dtype: str) -> dict[str, Any]:
    """The ``models`` row ``register_model`` inserts (checked: embedding, dim, dtype), incomplete."""
    if embedding not in EMBEDDINGS:
        raise UserError(f"extract.embedding: expected one of {'/'.join(EMBEDDINGS)}, got {embedding!r}")
    if int(dim) <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if dtype not in DTYPES:
        raise UserError(f"extract.dtype: expected one of {'/'.join(DTYPES)}, got {dtype!r}")
    return {"checkpoint_sha256": checkpoint_sha256, "embedding": embedding, "backbone": backbone,
            "dim": int(dim), "mean": json.dumps([float(x) for x in mean]),
            "std": json.dumps([float(x) for x in std]), "image_size": int(image_size),
            "pad_fill": pad_fill_code(pad_fill), "classes": json.dumps(list(classes)),
            "checkpoint_path": str(checkpoint_path), "epoch": epoch, "created": _now(), "complete": 0,
            "dtype": dtype}


def _plan_models(rows: list[ModelInfo], wanted: ModelInfo, replace_others: bool
                 ) -> tuple[ModelInfo | None, list[ModelInfo], ModelInfo | None]:
    """Of the store's model ``rows``: the one to keep for ``wanted`` (same checkpoint, embedding,
    preprocessing and dtype; None: a new row), the ones to drop (same key otherwise, and with
    ``replace_others`` every other), and the dropped complete float32 model whose vectors become
    the float16 ``wanted``'s by conversion (None: none)."""
    keep: ModelInfo | None = None
    dropped: list[ModelInfo] = []
    for m in rows:
        same_key = m.checkpoint_sha256 == wanted.checkpoint_sha256 and m.embedding == wanted.embedding
        if same_key and m.same_transform(wanted):
            keep = m
        elif same_key or replace_others:
            dropped.append(m)
    # float32 -> float16 of the same vectors: converted, not embedded again
    source = next((m for m in dropped if m.complete and (m.dtype, wanted.dtype) == ("float32", "float16")
                   and m.same_transform(dataclasses.replace(wanted, dtype=m.dtype))), None)
    return keep, dropped, source
