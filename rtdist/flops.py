"""How much arithmetic a model does and how much a device can: model FLOPs per token and the peak FLOP/s that
model FLOPs utilisation (MFU) is measured against, as torchtitan's metrics report it."""
from __future__ import annotations

import time
from typing import Optional

import torch

from .config import ModelConfig, layer_head_split

# Dense peak FLOP/s from the vendors' data sheets (no sparsity), by a substring of torch.cuda.get_device_name().
# Longer names first: "H100 PCIe" before "H100".
PEAK_FLOPS = {
    "bf16": [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10G", 70e12), ("L4", 121e12), ("V100", 125e12)],
    "fp32": [("H200", 67e12), ("H100 PCIe", 51e12), ("H100", 67e12), ("A100", 19.5e12), ("L40S", 91.6e12),
             ("A10G", 31.2e12), ("L4", 30.3e12), ("V100", 15.7e12)],
}


def model_flops(cfg: ModelConfig, n: int, batch: int) -> float:
    """Matmul FLOPs of one forward+backward (3x forward) of the LM on ``batch`` x ``n`` tokens: the attention FLOPs
    the causal attention needs (no masked-out work counted)."""
    d, hd, H = cfg.d_model, cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.n_heads
    hidden = int(d * cfg.ff_mult)
    per_token = 0.0
    for n_local in layer_head_split(cfg):
        if cfg.attention_type in ("full", "full_naive"):
            n_local, n_routing, proj = 0, 0, 4 * d * H * hd
            attn = H * hd * 2 * (n / 2)  # causal: on average n/2 keys, QK^T and PV
        else:
            n_routing = H - n_local
            shared = cfg.shared_qk and n_routing
            proj = d * H * hd * (3 if shared else 4) + (d * n_local * hd if shared else 0)
            lw = cfg.local_window_size or cfg.window_size
            # a query sees its own block causally (on average half of it) and the whole block before: 1.5 blocks
            attn = n_local * hd * 2 * (1.5 * lw) + n_routing * hd * 2 * (1.5 * cfg.window_size)
            attn += n_routing * hd * cfg.num_clusters  # nearest-centroid scores
        ff = d * hidden * (3 if cfg.ff_glu else 2)
        per_token += proj + ff + attn
    per_token += d * cfg.vocab_size  # tied output projection
    return 3 * 2 * per_token * n * batch


def matmul_rate(n: int = 4096, reps: int = 3, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s of an n x n product on ``device`` in ``dtype``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one ``device`` in ``precision``, where the figure comes from). A GPU the table knows: its
    data sheet; another GPU, or a CPU: a matmul measured now (a CPU's ``n = 2048``, about a second on 2 cores)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, flops in PEAK_FLOPS["bf16" if precision == "bf16" else "fp32"]:
            if part in name:
                return flops, f"{name} data sheet, {precision}"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return matmul_rate(8192, 5, device, dtype), f"{name} measured {precision} matmul"
    return matmul_rate(2048, 4), "measured fp32 matmul of this CPU"


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token at ``seq_length``."""
    return model_flops(cfg, seq_length, 1) / seq_length


def mfu(tokens_per_s: float, per_token: float, peak: Optional[float], devices: int) -> Optional[float]:
    """Model FLOPs utilisation of ``devices`` devices with one peak each."""
    return tokens_per_s * per_token / (peak * devices) if peak else None
