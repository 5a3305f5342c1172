"""This machine's one-thread limits and the physical floor of an fc-head trial (benchmarks/head_trainer.py).

    from hardware_floor import machine_limits, floor
    limits = machine_limits(features)            # GB/s and GFLOP/s, measured now
    floor(n_train, n_val, epochs, limits)        # GFLOP, GB read, and the seconds they need
"""

from __future__ import annotations

import time

import numpy as np

N_FEAT = 512


def machine_limits(feats: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Bandwidth and FLOP rate of one thread: the numbers the floor is computed from.

    numpy copy (read + write bytes) is the conventional figure; the two reads are what a
    compiled loop over the features can reach: every row once in storage order (streaming)
    and in a shuffled order (an epoch's gather: rows of 2 KiB at random addresses). FLOP/s:
    a 1024^3 float32 GEMM through torch (MKL/oneDNN), the best case for multiply-adds.
    """
    import numba
    import torch

    @numba.njit(nogil=True, fastmath=True)
    def read_rows(x, order):  # sums every value so the reads cannot be skipped
        acc = np.float32(0.0)
        for i in order:
            row = x[i]
            for j in range(row.shape[0]):
                acc += row[j]
        return acc

    torch.set_num_threads(1)
    n = feats.shape[0]
    buf = np.empty_like(feats)
    seq, shuffled = np.arange(n), np.random.default_rng(seed).permutation(n)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    np.copyto(buf, feats)
    read_rows(feats, seq[:10])
    best = {"copy": 1e9, "stream": 1e9, "rows": 1e9, "gemm": 1e9}
    for _ in range(5):
        for name, fn in (("copy", lambda: np.copyto(buf, feats)), ("stream", lambda: read_rows(feats, seq)),
                         ("rows", lambda: read_rows(feats, shuffled)), ("gemm", lambda: a @ b)):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    nbytes = feats.nbytes
    return {"copy_gbs": 2 * nbytes / best["copy"] / 1e9, "stream_read_gbs": nbytes / best["stream"] / 1e9,
            "shuffled_row_read_gbs": nbytes / best["rows"] / 1e9, "gemm_gflops_1t": 2 * 1024**3 / best["gemm"] / 1e9}


def floor(n_train: int, n_val: int, epochs: int, limits: dict[str, float]) -> dict[str, float]:
    """The physical floor of one trial: FLOPs at GEMM speed vs bytes at measured bandwidth."""
    steps = epochs * -(-n_train // 8)
    # torch's formulation: 2 logits; forward 2*2*D and backward (weights) 2*2*D per slice,
    # update ~6 flops per parameter per step; validation forward per val slice
    flops_torch = epochs * (n_train * 8 * N_FEAT + n_val * 4 * N_FEAT) + steps * 6 * 2 * (N_FEAT + 1)
    # the logit-difference formulation: half of that
    flops_diff = epochs * (n_train * 4 * N_FEAT + n_val * 2 * N_FEAT) + steps * 6 * (N_FEAT + 1)
    bytes_read = epochs * (n_train + n_val) * N_FEAT * 4
    return {"gflop_torch_form": flops_torch / 1e9, "gflop_diff_form": flops_diff / 1e9,
            "gb_read": bytes_read / 1e9,
            "flop_floor_s": flops_diff / (limits["gemm_gflops_1t"] * 1e9),
            "read_floor_stream_s": bytes_read / (limits["stream_read_gbs"] * 1e9),
            "read_floor_shuffled_s": bytes_read / (limits["shuffled_row_read_gbs"] * 1e9)}
