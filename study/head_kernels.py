"""Compiled epochs of a two-class linear head: SGD (momentum, L2 decay) and AdamW.

Used by study.head_trainer, which states the semantics; read that first. Here, only the loops.

Why these are numba loops and not torch: a step at batch 8 is about 16k multiply-adds, so a
torch step (a dozen ~µs kernel launches and autograd bookkeeping) costs 40-100x its arithmetic
(benchmarks/README.md, "Head trainer"). A compiled loop costs the arithmetic plus the reads.

Why only the logit difference is trained. For two classes the softmax, the cross-entropy and
the argmax depend on z1 - z0 = (W1 - W0)·x + (b1 - b0) alone, and the gradient of the class-0
row is exactly minus that of the class-1 row. So every update of the pair splits into one of
the difference D = W1 - W0 (data-dependent, done here) and one of the sum S = W0 + W1, which
sees only weight decay: S after t steps is a scalar times S at the start (study.head_trainer
carries that scalar in closed form). SGD: D's gradient is 2g + wd·D and its momentum buffer is
buf1 - buf0; AdamW: the two rows' moments are m1 = -m0 and v1 = v0, so D moves by twice the
class-1 step. This halves the work and is exact in real arithmetic; float rounding differs
from torch's by the order of operations only (tests/study/test_head_trainer.py bounds it).

Each kernel runs one epoch for the configurations ``cfgs`` (indices into the state arrays),
all sharing one batch order: the batch rows are gathered once and serve every configuration,
which is what makes several configurations in one pass cheaper than one each. The kernels
release the GIL, so the caller may run disjoint ``cfgs`` on several threads at once.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# A batch's sum of log(1 + exp(-|d|)) is taken as the log of a running product (one log per
# batch instead of one per slice); each factor is in (1, 2], so flush well before overflow.
_PRODUCT_FLUSH = 1e250


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _logistic_batch(xb, yb, bs, w, b, inv_bs, zero, r):
    """Residuals r[i] = (sigmoid(d_i) - y_i) / bs for d = xb @ w + b; returns (sum r, sum CE).

    Cross-entropy of slice i is softplus(d_i) for label 0 and softplus(-d_i) for label 1,
    i.e. max(z, 0) + log(1 + exp(-|d|)) with z = d or -d. ``zero`` is 0 in the state dtype
    (numba would widen a literal 0.0 and with it the whole dot product to float64).
    """
    n_feat = w.shape[0]
    r_sum = zero
    loss = 0.0
    prod = 1.0
    for i in range(bs):
        x = xb[i]
        acc = zero
        for j in range(n_feat):
            acc += x[j] * w[j]
        d = float(acc + b)
        ea = math.exp(-abs(d))
        q = 1.0 + ea
        p = 1.0 / q if d >= 0.0 else ea / q
        z = d if yb[i] == 0.0 else -d
        loss += z if z > 0.0 else 0.0
        prod *= q
        if prod > _PRODUCT_FLUSH:
            loss += math.log(prod)
            prod = 1.0
        r[i] = (p - yb[i]) * inv_bs
        r_sum += r[i]
    return r_sum, loss + math.log(prod)


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _gradient(xb, bs, r, g):
    """g = sum_i r[i] * xb[i]: the class-1 weight gradient of the batch's mean CE."""
    g[:] = 0.0
    for i in range(bs):
        x = xb[i]
        ri = r[i]
        for j in range(g.shape[0]):
            g[j] += ri * x[j]


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def sgd_epoch(feats, labels, order, batch, cfgs, dw, db, bw, bb, hyper, losses):
    """One epoch of torch.optim.SGD (dampening 0, no Nesterov) on the logit difference.

    Args:
        feats: float32 (n, n_feat) training features.
        labels: float64 (n,) 0/1 labels.
        order: int64 (n,) the epoch's slice order; consecutive ``batch`` entries form a step.
        batch: batch size (the last batch may be smaller).
        cfgs: int64 indices of the configurations to train (rows of the arrays below).
        dw, db: (K, n_feat), (K,) difference weights/bias, updated in place.
        bw, bb: their momentum buffers (start at zero: momentum * 0 + g is torch's first
            step, buffer = g), updated in place.
        hyper: float64 (K, 3) lr, momentum, weight_decay.
        losses: float64 (K,); receives the epoch's summed per-slice cross-entropy.
    """
    n, n_feat = order.shape[0], dw.shape[1]
    xb = np.empty((batch, n_feat), feats.dtype)
    yb = np.empty(batch, np.float64)
    r = np.zeros(batch, dw.dtype)
    g = np.zeros(n_feat, dw.dtype)
    s = np.zeros(5, dw.dtype)  # float64 values cast into the state dtype, as torch casts them
    for k in cfgs:
        losses[k] = 0.0
    for start in range(0, n, batch):
        bs = min(start + batch, n) - start
        for i in range(bs):
            xb[i, :] = feats[order[start + i]]
            yb[i] = labels[order[start + i]]
        s[0] = 1.0 / bs
        s[1] = 0.0
        inv_bs, zero = s[0], s[1]
        for k in cfgs:
            w, buf = dw[k], bw[k]
            s[2], s[3], s[4] = hyper[k, 0], hyper[k, 1], hyper[k, 2]
            lr, mom, wd = s[2], s[3], s[4]
            r_sum, loss = _logistic_batch(xb, yb, bs, w, db[k], inv_bs, zero, r)
            losses[k] += loss
            _gradient(xb, bs, r, g)
            for j in range(n_feat):
                buf[j] = mom * buf[j] + ((g[j] + g[j]) + wd * w[j])
                w[j] -= lr * buf[j]
            bb[k] = mom * bb[k] + ((r_sum + r_sum) + wd * db[k])
            db[k] -= lr * bb[k]


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def adamw_epoch(feats, labels, order, batch, cfgs, dw, db, mw, mb, vw, vb, hyper, step0, losses):
    """One epoch of torch.optim.AdamW (betas 0.9/0.999, eps 1e-8, no amsgrad).

    Args as sgd_epoch, plus: mw, mb / vw, vb the first / second moments of the class-1 row
    (start at zero), hyper float64 (K, 2) lr and weight_decay, step0 the steps done before this epoch
    (for the bias corrections). Returns the step count after the epoch.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n, n_feat = order.shape[0], dw.shape[1]
    xb = np.empty((batch, n_feat), feats.dtype)
    yb = np.empty(batch, np.float64)
    r = np.zeros(batch, dw.dtype)
    g = np.zeros(n_feat, dw.dtype)
    s = np.zeros(9, dw.dtype)  # float64 values cast into the state dtype, as torch casts them
    step = step0
    for k in cfgs:
        losses[k] = 0.0
    for start in range(0, n, batch):
        bs = min(start + batch, n) - start
        for i in range(bs):
            xb[i, :] = feats[order[start + i]]
            yb[i] = labels[order[start + i]]
        step += 1
        s[0] = 1.0 / bs
        s[1] = 1.0 - beta1
        s[2] = 1.0 - beta2
        s[3] = beta2
        s[4] = math.sqrt(1.0 - beta2**step)  # sqrt of bias correction 2
        s[5] = eps
        s[6] = 0.0
        inv_bs, one_m_b1, one_m_b2, b2, bc2_sqrt, eps_s, zero = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
        bc1 = 1.0 - beta1**step
        for k in cfgs:
            w, m, v = dw[k], mw[k], vw[k]
            s[7] = 1.0 - hyper[k, 0] * hyper[k, 1]  # decoupled decay factor
            s[8] = 2.0 * hyper[k, 0] / bc1  # twice the step size: D moves by 2x the class-1 step
            decay, step2 = s[7], s[8]
            r_sum, loss = _logistic_batch(xb, yb, bs, w, db[k], inv_bs, zero, r)
            losses[k] += loss
            _gradient(xb, bs, r, g)
            for j in range(n_feat):
                m[j] += one_m_b1 * (g[j] - m[j])  # torch: exp_avg.lerp_(grad, 1 - beta1)
                v[j] = b2 * v[j] + one_m_b2 * g[j] * g[j]
                w[j] = w[j] * decay - step2 * m[j] / (math.sqrt(v[j]) / bc2_sqrt + eps_s)
            mb[k] += one_m_b1 * (r_sum - mb[k])
            vb[k] = b2 * vb[k] + one_m_b2 * r_sum * r_sum
            db[k] = db[k] * decay - step2 * mb[k] / (math.sqrt(vb[k]) / bc2_sqrt + eps_s)
    return step
