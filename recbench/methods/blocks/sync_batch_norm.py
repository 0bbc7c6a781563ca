"""Batch normalisation over the whole global batch of a distributed run, on CPU (gloo).

``torch.nn.SyncBatchNorm`` runs on CUDA only. ``batch_norm`` here normalises (N_r, C) values of
this rank with the mean and variance of every rank's values, as ``F.batch_norm`` does for the
whole batch in one process, and updates the running statistics the same way (momentum, unbiased
variance, ``num_batches_tracked``), identically on every rank. Values may carry a 0/1 weight:
weight-0 values are normalised but do not enter the statistics, so an entry that several ranks
hold (the same unique row looked up on two ranks) is counted once, as in one process
(``batch_part.first_holder``).

Forward: count = sum_r sum_i w_i, mean = sum w x / count, var = sum w (x - mean)^2 / count (two
all-reduces: the centred second pass avoids the cancellation of E[x^2] - E[x]^2);
y = (x - mean) / sqrt(var + eps). Backward, with g = dL_r/dy of this rank and sums over every
rank's values (all-reduced): dx_i = (g_i - w_i * sum g / count - w_i * y_i * sum(g y) / count)
/ sqrt(var + eps). This is d(sum_r L_r)/dx_i, the gradient each rank contributes before the
gradients are averaged over ranks (the convention of ``ProcessGroupParallel``).

In one process (``world`` 1) ``batch_norm`` is ``F.batch_norm`` itself.

Shapes: x (N_r, C), weights (N_r,) -> (N_r, C).

References: Ioffe & Szegedy, "Batch Normalization", ICML 2015; PyTorch ``SyncBatchNorm``
(the same reduction, over CUDA ranks); ``recbench.methods.blocks.batch_part``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.blocks import batch_part


class _GlobalBatchNorm(torch.autograd.Function):
    """forward(x (N_r, C), weights (N_r,), eps, world) -> (y (N_r, C), mean (C,), biased var (C,), count ())."""

    @staticmethod
    def forward(ctx, x, weights, eps, world):
        w = weights.to(x.dtype).unsqueeze(1)
        count = batch_part.sum_over_ranks(w.sum().reshape(1), world)
        mean = batch_part.sum_over_ranks((w * x).sum(0), world) / count
        centred = x - mean
        var = batch_part.sum_over_ranks((w * centred * centred).sum(0), world) / count
        invstd = torch.rsqrt(var + eps)
        y = centred * invstd
        ctx.world = world
        ctx.save_for_backward(y, w, invstd, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad, _mean, _var, _count):
        y, w, invstd, count = ctx.saved_tensors
        sums = batch_part.sum_over_ranks(torch.cat([grad.sum(0), (grad * y).sum(0)]), ctx.world)
        mean_grad, mean_grad_y = (sums / count).chunk(2)
        return (grad - w * mean_grad - w * y * mean_grad_y) * invstd, None, None, None


def batch_norm(x: torch.Tensor, norm: nn.BatchNorm1d, training: bool, world: int = 1,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``norm`` (its buffers and settings, no affine parameters) applied to x (N_r, C).

    ``training``: normalise with the (global) batch statistics and update the running ones;
    else use the running statistics. ``world`` > 1: this rank's values are part of a batch over
    ``world`` ranks (every rank must call this in the same order); ``weights`` (N_r,) 0/1 marks
    the values that enter the statistics (default: all)."""
    if world == 1 or not training:
        return F.batch_norm(x, norm.running_mean, norm.running_var, training=training, momentum=norm.momentum,
                            eps=norm.eps)
    return global_batch_norm(x, norm, world, weights)


def global_batch_norm(x: torch.Tensor, norm: nn.BatchNorm1d, world: int,
                      weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training-mode ``batch_norm`` over the ``world`` ranks' values (x (N_r, C), weights (N_r,));
    with ``world`` 1 the same computation within this process (what the tests compare with
    ``nn.BatchNorm1d``)."""
    if norm.affine:
        raise ValueError("sync_batch_norm: affine batch norm is not supported (the logits' batch norm has none)")
    weights = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else weights
    y, mean, var, count = _GlobalBatchNorm.apply(x, weights, norm.eps, world)
    with torch.no_grad():
        n = float(count)
        if norm.momentum is None:  # cumulative average, as F.batch_norm with momentum None
            factor = 1.0 / float(norm.num_batches_tracked + 1)
        else:
            factor = norm.momentum
        norm.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
        norm.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=factor)
    return y
