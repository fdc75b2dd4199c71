"""An RNNT loss in plain PyTorch, vectorized over the label axis: the fallback for hosts where
NeMo's Numba loss cannot run (no CUDA compiler for Numba), and faster than it on CPU.

The forward variable of the transducer lattice,
    alpha[t, u] = logaddexp(alpha[t-1, u] + blank[t-1, u], alpha[t, u-1] + emit[t, u-1]),
is, for one t, a first-order linear recurrence along u in log space; with
C[u] = sum_{j<u} emit[t, j] it has the closed form
    alpha[t, u] = C[u] + logcumsumexp_{k<=u}(alpha[t-1, k] + blank[t-1, k] - C[k]),
so the loss takes T vectorized steps (not T*U scalar ones) and autograd gives the gradient.
"""

from __future__ import annotations

import torch


def rnnt_loss(logits: torch.Tensor, labels: torch.Tensor, act_lens: torch.Tensor, label_lens: torch.Tensor,
              blank: int) -> torch.Tensor:
    """Per-utterance negative log-likelihood. logits [B, T, U+1, V] (unnormalized), labels [B, U]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    B, T, U1, _ = logp.shape
    U = U1 - 1
    blank_lp = logp[..., blank]                                               # [B, T, U+1]
    if U > 0:
        emit_lp = torch.gather(logp[:, :, :U, :], 3, labels[:, None, :U, None].expand(B, T, U, 1))[..., 0]
    else:
        emit_lp = logp.new_zeros(B, T, 0)
    zero = logp.new_zeros(B, T, 1)
    C = torch.cat([zero, emit_lp.cumsum(-1)], dim=-1)                          # [B, T, U+1]
    neg_inf = torch.finfo(logp.dtype).min / 4
    # t = 0: only emissions
    alpha = C[:, 0]
    alphas = [alpha]
    for t in range(1, T):
        a = alpha + blank_lp[:, t - 1] - C[:, t]
        alpha = C[:, t] + torch.logcumsumexp(a, dim=-1)
        alphas.append(alpha)
    alpha_all = torch.stack(alphas, dim=1)                                    # [B, T, U+1]
    b = torch.arange(B, device=logp.device)
    t_last = (act_lens - 1).clamp(min=0)
    ll = alpha_all[b, t_last, label_lens] + blank_lp[b, t_last, label_lens]
    ll = torch.where(act_lens > 0, ll, torch.full_like(ll, neg_inf))
    return -ll


class ScanRNNTLoss(torch.nn.Module):
    """Drop-in for the `_loss` inside NeMo's RNNTLoss (which sets `reduction` and reduces)."""

    def __init__(self, blank: int, reduction=None):
        super().__init__()
        self.blank = blank
        self.reduction = reduction

    def forward(self, acts, labels, act_lens, label_lens):
        losses = rnnt_loss(acts, labels, act_lens, label_lens, self.blank)
        if self.reduction == "mean_batch":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        if self.reduction == "mean":
            return (losses / label_lens.clamp(min=1)).mean()
        return losses


def use_scan_loss(model) -> None:
    """Replace the RNNT loss kernel of a NeMo transducer model (its joint's too, when fused)."""
    loss = model.loss
    loss._loss = ScanRNNTLoss(blank=loss._blank)
    loss._force_float32 = True
    if getattr(model.joint, "_loss", None) is not None:
        model.joint.set_loss(loss)


def numba_loss_works(model, device: torch.device) -> tuple[bool, str]:
    """Runs NeMo's configured RNNT loss once on a small batch on `device`, checks it against this
    module's loss."""
    try:
        g = torch.Generator().manual_seed(0)
        V = model.joint.num_classes_with_blank
        logits = torch.randn(2, 6, 4, V, generator=g).to(device)
        labels = torch.randint(0, V - 1, (2, 3), generator=g).to(device)
        act = torch.tensor([6, 5], device=device)
        lab = torch.tensor([3, 2], device=device)
        loss = model.loss._loss
        saved = loss.reduction
        loss.reduction = None
        try:
            got = loss(acts=logits, labels=labels, act_lens=act, label_lens=lab)
        finally:
            loss.reduction = saved
        ref = rnnt_loss(logits, labels, act, lab, model.loss._blank)
        if not torch.allclose(got.float().cpu(), ref.float().cpu(), atol=1e-3, rtol=1e-3):
            return False, f"disagrees with the reference: {got.tolist()} vs {ref.tolist()}"
        return True, "ok"
    except Exception as e:  # Numba without a CUDA compiler fails here
        return False, f"{type(e).__name__}: {e}"
