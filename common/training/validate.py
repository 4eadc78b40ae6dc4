"""k-NN validation during training: val embedded, ranked against train, checkpoints compared."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..config.schema import Config
from ..data.datasets import ImageListDataset, worker_errors
from ..data.transforms import eval_transform
from ..model.embed import embed_batch
from ..model.network import SupConModel
from ..runtime.distributed import broadcast_buffers, gather_strided, go_no_go

EVAL_BATCH_FACTOR = 2  # k-NN evaluation batch = this x train.batch_size (no activations kept for backward)


# ----------------------------------------------------------------------------- evaluation


def embed(model: SupConModel, loader: Iterable, device: torch.device, amp: str, channels_last: bool) -> torch.Tensor:
    """L2-normalised backbone features ``(N, dim_in)`` float32 of every batch of ``loader`` (CPU)."""
    out = [embed_batch(model, x, "encoder", amp, device, channels_last).cpu() for x, _, _ in loader]
    return torch.cat(out) if out else torch.zeros((0, model.dim_in))


def knn_metrics(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                n_classes: int, k: int, temperature: float, device: torch.device | None = None) -> dict[str, float]:
    """Retrieval of ``val`` in ``train``: top-1 accuracy, weighted k-NN accuracy, top-1 macro-F1."""
    from sklearn.metrics import f1_score

    from ..retrieval.search import knn_vote, topk

    k = max(1, min(k, train_x.shape[0]))
    sims, idx = topk(val_x, train_x, k, device=device)
    sims, idx = torch.as_tensor(sims).cpu(), torch.as_tensor(idx).cpu()
    top1 = train_y[idx[:, 0]]
    pred, _ = knn_vote(sims, idx, train_y, n_classes, temperature)
    pred = torch.as_tensor(pred).cpu()
    y = val_y.numpy()
    return {"val_top1": float((top1 == val_y).float().mean()),
            "val_knn": float((pred == val_y).float().mean()),
            "val_macro_f1": float(f1_score(y, top1.numpy(), average="macro", zero_division=0))}


class Evaluator:
    """k-NN validation on backbone features: train split = gallery, val split = queries.

    Every rank embeds the rows ``rank::world`` of each split; the shards are reassembled on every
    rank (``gather_strided``) and the metrics computed there.
    """

    def __init__(self, cfg: Config, train_paths: Sequence[str], train_labels: Sequence[int],
                 val_paths: Sequence[str], val_labels: Sequence[int], n_classes: int, stats: dict,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.n_classes = cfg, device, n_classes
        self.rank, self.world_size = rank, world_size
        tf = eval_transform(cfg.model.image_size, stats["mean"], stats["std"], cfg.data.pad_fill)
        self.sets = {}
        for name, paths, labels in (("train", train_paths, train_labels), ("val", val_paths, val_labels)):
            ds = ImageListDataset(list(paths)[rank::world_size], list(labels)[rank::world_size], tf)
            self.sets[name] = (ds, len(paths), torch.as_tensor(list(labels), dtype=torch.long))

    @property
    def enabled(self) -> bool:
        return self.sets["val"][1] > 0 and self.sets["train"][1] > 0

    def _loader(self, ds: ImageListDataset) -> torch.utils.data.DataLoader:
        g = torch.Generator()
        g.manual_seed(self.cfg.run.seed)  # the loader's own generator: evaluation never moves the global RNG
        from ..runtime.seed import worker_init_fn

        w = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.train.batch_size * EVAL_BATCH_FACTOR, shuffle=False,
                                           num_workers=w, pin_memory=self.device.type == "cuda",
                                           worker_init_fn=worker_init_fn if w > 0 else None, generator=g)

    def __call__(self, model: SupConModel) -> dict[str, float]:
        was_training = model.training
        broadcast_buffers(model)  # every rank embeds with rank 0's batch-norm statistics
        model.eval()
        cl = self.device.type == "cuda" and self.cfg.model.channels_last
        feats = {}
        try:
            for name, (ds, n, _) in self.sets.items():
                with go_no_go(), worker_errors():  # a rank's unreadable image stops every rank
                    local = embed(model, self._loader(ds), self.device, self.cfg.train.amp, cl)
                feats[name] = gather_strided(local.to(self.device), n).cpu()
        finally:
            model.train(was_training)
        t = self.cfg.train
        return knn_metrics(feats["train"], self.sets["train"][2], feats["val"], self.sets["val"][2], self.n_classes,
                           t.eval_knn_k, t.temperature, device=self.device)
