"""What ``benchmarks/gpu_bench.py`` measures with: synchronised clocks, peak memory, FLOPs per training step and the
peak FLOP/s of known GPUs (for model FLOPs utilisation). No Ray, no MLflow.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Peak dense (no sparsity) 16-bit tensor-core throughput in TFLOP/s: bf16 and fp16 are the same on these parts
# except T4 (Turing), which has no bf16 tensor cores (its fp16 figure is used for fp16 runs). Sources: NVIDIA
# datasheets — H200 (SXM 1,979 / NVL 1,671 TFLOPS BF16 "with sparsity"), H100 (SXM 1,979 / NVL 1,671 / PCIe
# 1,513 with sparsity), A100 (BF16 312 dense, 624 sparse), L4 (BF16 242 with sparsity), T4 (FP16 65 mixed
# precision). Sparse figures are halved. Ordered most specific first: get_device_name gives e.g. "NVIDIA H100 PCIe",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "Tesla T4".
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5}),
    ("H200", {"bf16": 989.5, "fp16": 989.5}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5}),
    ("H100", {"bf16": 989.5, "fp16": 989.5}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0}),
    ("T4", {"fp16": 65.0}),
]
PEAK_SOURCE = "NVIDIA datasheets (H200, H100, A100, L4, T4): dense 16-bit tensor-core peak (sparse figure / 2)"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of ``device_name`` (``torch.cuda.get_device_name``) in ``precision`` ('bf16' | 'fp16');
    None for a GPU not in ``PEAK_TFLOPS``, for fp32 (MFU is quoted against 16-bit peaks) and for CPUs."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it sees the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device finished what was queued (seconds)."""
    synchronize(device)
    return time.perf_counter()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory while the ``with`` block runs: ``torch.cuda.max_memory_allocated`` on CUDA (tensors, after
    resetting the peak), else the process's resident set size sampled every 5 ms from ``/proc/self/statm``
    (``kind`` 'cpu_rss_sampled'), or where that is missing ``ru_maxrss`` (``kind`` 'cpu_ru_maxrss': the process's
    lifetime peak, not the block's). ``peak`` is in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(0.005)

    def __enter__(self) -> PeakMemory:
        self.peak = 0
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_bytes() is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.kind = "cpu_ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def count_flops(fn) -> int:
    """FLOPs of the matmuls, convolutions and attention ``fn()`` runs (forward and any backward it calls), by
    ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add). On CPU the fused SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no formula there, so attention is not counted."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
