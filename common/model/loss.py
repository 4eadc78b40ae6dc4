"""Supervised Contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning", NeurIPS).

The ``L_out`` form (eq. 2), the one the paper recommends: the mean over positives is taken
OUTSIDE the log. With ``N = B * V`` contrast vectors ``z`` (every view of every image), anchors
``i`` (every view for ``contrast_mode="all"``, view 0 only for ``"one"``), ``A(i)`` every
contrast but ``i`` itself and ``P(i) ⊂ A(i)`` the positives of ``i`` (same label; for SimCLR,
``labels=None``, the other views of the same image)::

    loss_i = -(T / T_base) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )
    loss   = mean of loss_i over the anchors that have at least one positive

The scale ``T / T_base`` and the order of the contrast vectors (view-major: ``torch.cat(
torch.unbind(features, 1))``) are those of the reference code (HobbitLong/SupContrast
``losses.py``), so values match it wherever every anchor has a positive.

**Anchors without a positive** (a class seen once in the batch with ``n_views=1``, or
``contrast_mode="one"`` with one view and a singleton class) are LEFT OUT of the mean: eq. 2 is
undefined for them (``1/|P(i)|`` with ``|P(i)| = 0``). The reference code gives them a loss of 0
and still counts them in the mean, which shrinks the loss as singletons grow more frequent. When
no anchor has a positive the loss is a zero that still has a ``grad_fn`` (backward runs, the
gradients are zero).

How it is computed (the same numbers as the reference, with less work and memory):

- ``log_prob_ij = l_ij - logsumexp_{a != i} l_ia`` with ``l = z_i.z_j / T``; the log-sum-exp
  subtracts the row max (stable at small T), and the self-contrast is excluded by setting the
  diagonal of the logits to ``-inf`` instead of multiplying by a scattered ``(N, N)`` mask.
- The positive term is linear in the logits, so it needs no ``(N, N)`` mask at all:
  ``sum_{p in P(i)} l_ip = z_i . (sum_{p in P(i)} z_p) / T``, where the sum of positives is the
  per-class sum of the vectors (the ``(B, B)`` label-equality matrix over images times the
  per-image sum of views) minus ``z_i``. No ``torch.unique`` and no ``index_add_``: nothing that
  syncs the GPU or is non-deterministic on CUDA.
- The log-sum-exp is a small autograd function (``_NonSelfLogSumExp``) that holds ONE ``(A, N)``
  buffer (logits turned into the softmax in place, kept for backward) and computes its gradient
  with two matrix products; the reference keeps about eight ``(N, N)`` tensors, ``mask.repeat``
  included. Double backward is not supported (SupCon training never needs it).
- Logits are float32 at least, also under autocast (features cast at the top, autocast off
  inside); float64 inputs stay float64 (gradcheck, reference tests).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

ContrastMode = Literal["all", "one"]


def _positive_stats(features: torch.Tensor, labels: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image ``b``: the sum of the positive weights' vectors over all views, the self weight, and the count.

    Returns ``pos_sum (B, D)`` = ``sum_{b'} m[b, b'] * sum_v z[b', v]``, ``self_w (B,)`` = ``m[b, b]``
    and ``count (B,)`` = ``V * sum_{b'} m[b, b'] - m[b, b]`` (the positives of an anchor of image
    ``b``, itself excluded), where ``m`` is the (B, B) positive mask (label equality, identity for
    SimCLR, or the given mask).
    """
    B, V, _ = features.shape
    view_sum = features.sum(dim=1)  # (B, D): sum over the views of each image
    if mask is not None:  # explicit (B, B) weights, as in the reference: O(B^2), never (N, N)
        m = mask.to(device=features.device, dtype=features.dtype)
        self_w = m.diagonal()  # (B,)
        return m @ view_sum, self_w, V * m.sum(dim=1) - self_w
    ones = features.new_ones(B)
    if labels is None:  # SimCLR: the positives of an image are its own other views
        return view_sum, ones, ones * (V - 1)
    # Label equality as a (B, B) matrix over images (not the (N, N) one over views): one matrix
    # product. Neither torch.unique (its output size depends on the data: a GPU sync every step)
    # nor index_add_ (atomic adds: not deterministic on CUDA); O(B^2 D), small beside the (A, N) logits.
    same = (labels[:, None] == labels[None, :]).to(view_sum.dtype)  # (B, B), 1 on the diagonal
    return same @ view_sum, ones, V * same.sum(dim=1) - 1


class _NonSelfLogSumExp(torch.autograd.Function):
    """``lse_i = log sum_{j != i} exp(q_i . c_j)`` for ``q (A, D)``, ``c (N, D)``, ``A <= N``.

    One ``(A, N)`` buffer in all: the logits are turned into the softmax in place and saved for
    backward, where the gradient needs no other ``(A, N)`` tensor:
    ``dq = g * (P @ c)`` (rows scaled after the product) and ``dc = P.T @ (g * q)`` (rows of
    ``q`` scaled before it). Autograd's ``logsumexp`` keeps about four such tensors alive.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p = q @ c.T  # (A, N) logits
        p.diagonal().fill_(float("-inf"))  # leave out the self-contrast (anchor i is contrast i)
        row_max = p.amax(dim=1, keepdim=True)  # finite: every row has N - 1 >= 1 other contrasts
        p.sub_(row_max).exp_()  # exp(l - max): stable, <= 1, exactly 0 on the diagonal
        total = p.sum(dim=1, keepdim=True)  # >= 1
        p.div_(total)  # softmax over the non-self contrasts
        ctx.save_for_backward(q, c, p)
        return (row_max + total.log()).squeeze(1)  # (A,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        q, c, p = ctx.saved_tensors
        with torch.autocast(device_type=q.device.type, enabled=False):
            g = g.to(p.dtype)[:, None]  # (A, 1)
            dq = (p @ c) * g  # (A, D)
            dc = p.T @ (q * g)  # (N, D)
        return dq, dc


def _check_inputs(features: torch.Tensor, labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                  temperature: float, base_temperature: float,
                  contrast_mode: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``supcon_loss``'s arguments checked (``ValueError`` naming the one at fault): the features
    as (B, V, D), the labels as (B,) on their device."""
    if features.dim() < 3:
        raise ValueError(f"SupCon features must be (batch, n_views, dim), got shape {tuple(features.shape)}")
    if features.dim() > 3:
        features = features.reshape(features.shape[0], features.shape[1], -1)
    if labels is not None and mask is not None:
        raise ValueError("SupCon: give labels or mask, not both")
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"SupCon: unknown contrast_mode {contrast_mode!r} (all, one)")
    if not temperature > 0 or not base_temperature > 0:
        raise ValueError(f"SupCon: temperatures must be > 0 (temperature={temperature}, "
                         f"base_temperature={base_temperature})")
    B = features.shape[0]
    if labels is not None:
        labels = labels.reshape(-1)
        if labels.shape[0] != B:
            raise ValueError(f"SupCon: {labels.shape[0]} labels for a batch of {B}")
        labels = labels.to(features.device)
    if mask is not None and tuple(mask.shape) != (B, B):
        raise ValueError(f"SupCon: mask must be ({B}, {B}), got {tuple(mask.shape)}")
    return features, labels


def supcon_loss(features: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, temperature: float = 0.07,
                base_temperature: float = 0.07, contrast_mode: ContrastMode = "all") -> torch.Tensor:
    """SupCon loss (Khosla et al. 2020, eq. 2, ``L_out``) of ``features (B, V, D)``.

    ``features`` must be L2-normalised along the last dimension (not renormalised here); extra
    trailing dimensions are flattened as in the reference. ``labels (B,)`` gives the classes;
    ``labels=None`` and ``mask=None`` is SimCLR (only the other views of the same image are
    positives); ``mask (B, B)``, ``mask[i, j] = 1`` when image ``j`` is a positive of anchor
    image ``i``, may be given instead of labels. ``contrast_mode="all"`` uses every view as an
    anchor, ``"one"`` view 0 only. Anchors without any positive are left out of the mean (see
    the module docstring); a zero with a ``grad_fn`` is returned when no anchor has one.
    Returns a scalar (float32, or float64 for float64 features).
    """
    features, labels = _check_inputs(features, labels, mask, temperature, base_temperature, contrast_mode)
    B, V, _ = features.shape

    with torch.autocast(device_type=features.device.type, enabled=False):
        if features.dtype not in (torch.float32, torch.float64):
            features = features.float()  # logits in float32 even when the model ran in fp16/bf16
        N = B * V
        A = N if contrast_mode == "all" else B
        if N < 2:  # a single vector: nothing to contrast with
            return features.sum() * 0.0
        contrast = features.transpose(0, 1).reshape(N, -1)  # (N, D) view-major, as the reference's cat(unbind)
        anchor = contrast[:A]  # (A, D): anchor i is contrast i (view 0 comes first)

        pos_sum_b, self_w_b, count_b = _positive_stats(features, labels, mask)
        img = torch.arange(A, device=features.device) % B  # (A,) image of each anchor
        count = count_b[img]  # (A,) |P(i)|
        valid = count > 0  # no host sync: with N >= 2 every row below stays finite

        inv_t = 1.0 / temperature
        # (A,) log sum_{a in A(i)} exp(z_i.z_a / T): the only (A, N) work, row max subtracted
        lse = _NonSelfLogSumExp.apply(anchor * inv_t, contrast)

        # sum_{p in P(i)} l_ip = z_i . (positive vectors' sum - self weight * z_i) / T
        pos = pos_sum_b[img] - self_w_b[img, None] * anchor  # (A, D)
        pos_logit_sum = (anchor * pos).sum(dim=1) * inv_t  # (A,)
        mean_log_prob_pos = pos_logit_sum / count.clamp_min(1e-12) - lse  # (A,)

        per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
        per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
        # Mean over the anchors with a positive; 0 (with a grad_fn) when there is none.
        return per_anchor.sum() / valid.sum().clamp_min(1)


class SupConLoss(nn.Module):
    """Supervised Contrastive loss as a module; see :func:`supcon_loss` and the module docstring.

    ``SupConLoss(temperature=0.07, base_temperature=0.07, contrast_mode="all")``;
    ``forward(features (B, V, D) L2-normalised, labels (B,) | None, mask (B, B) | None) -> scalar``.
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07,
                 contrast_mode: ContrastMode = "all") -> None:
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"SupCon: unknown contrast_mode {contrast_mode!r} (all, one)")
        if not temperature > 0 or not base_temperature > 0:
            raise ValueError(f"SupCon: temperatures must be > 0 (temperature={temperature}, "
                             f"base_temperature={base_temperature})")
        self.temperature = float(temperature)
        self.base_temperature = float(base_temperature)
        self.contrast_mode = contrast_mode

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of ``features (B, V, D)`` with ``labels (B,)`` (or ``mask (B, B)``, or neither: SimCLR)."""
        return supcon_loss(features, labels, mask, temperature=self.temperature,
                           base_temperature=self.base_temperature, contrast_mode=self.contrast_mode)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"contrast_mode={self.contrast_mode!r}")
