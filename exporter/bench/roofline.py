"""The roofline: what this machine could do at best, and what a LLaVA run must do at least.

Machine (measured in the benchmark's own process, with its thread count, before and after the
runs; the best of each):
    read bandwidth   GB/s a sum over a buffer much larger than the last-level cache reads
    copy bandwidth   GB/s (bytes read + bytes written) of a copy between two such halves
    GEMM rate        float32 GFLOP/s of an n x n x n matrix multiply (2 n^3 FLOPs)

Model (counted from the reference's parameters, in the graph's dtype):
    decode step      reads every decoder weight once: all layers, the final norm, lm_head.
                     The embedding table is a lookup of B rows, not a read of the matrix.
    prefill          2 FLOPs per weight per token for the layers (a multiply and an add), plus
                     causal attention (QK^T and AV over the lower triangle), plus lm_head at the
                     last position only (the graph computes logits for it alone).
    image encode     the CLIP tower up to the selected layer over its patches + CLS, plus the
                     projector over the image tokens.

Bound for each phase = max(bytes / bandwidth, FLOPs / GEMM rate): decode is bound by the
first term (about 0.5 FLOP per byte of float32 weights at batch 1), prefill and image encode
by the second. Real runs are slower: the bound ignores activations, the KV cache, and every
kernel's distance from the machine's best GEMM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---------------------------------------------------------------------------------------------
# The machine


@dataclass
class MachineRates:
    read_gb_s: float  # GB = 1e9 bytes
    copy_gb_s: float
    gemm_gflop_s: float  # float32
    threads: int
    buffer_mib: int
    gemm_size: int


def _best_seconds(work, repeats: int) -> float:
    """Best wall time of `work()` over `repeats` runs after one warm-up (the least disturbed
    run is the closest to what the hardware can do on a shared machine)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(buffer_mib: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """(read GB/s, copy GB/s) over a float32 buffer of `buffer_mib` MiB, with torch's threads.

    Read: sum the whole buffer. Copy: first half into the second (bytes counted: read + write).
    torch rather than numpy because numpy's reductions use one core and the runs it is
    compared with use all of them.
    """
    import torch

    count = buffer_mib * 2**20 // 4
    buffer = torch.empty(count, dtype=torch.float32)
    buffer.fill_(1.0)  # touch every page before timing
    half = count // 2
    source, target = buffer[:half], buffer[half : 2 * half]
    copy_s = _best_seconds(lambda: target.copy_(source), repeats)
    return _read_gb_s(buffer, repeats), 2 * half * 4 / copy_s / 1e9


def _read_gb_s(buffer, repeats: int) -> float:
    """GB/s of summing a float32 torch buffer, the best of `repeats`."""
    return buffer.numel() * 4 / _best_seconds(lambda: buffer.sum(), repeats) / 1e9


def measure_read(buffer_mib: int = 1024, repeats: int = 3) -> float:
    """Read GB/s alone (measure_bandwidth's first figure): quick enough to take between runs."""
    import torch

    return _read_gb_s(torch.ones(buffer_mib * 2**20 // 4, dtype=torch.float32), repeats)


def measure_gemm(size: int = 2048, repeats: int = 3) -> float:
    """float32 GFLOP/s of a size x size x size matrix multiply, with torch's threads."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return gemm_flops(size) / seconds / 1e9


def gemm_flops(size: int) -> float:
    return 2.0 * size**3


def measure_machine(
    threads: int, buffer_mib: int = 1024, gemm_size: int = 2048, repeats: int = 5
) -> MachineRates:
    read, copy = measure_bandwidth(buffer_mib, repeats)
    return MachineRates(read, copy, measure_gemm(gemm_size, repeats), threads, buffer_mib, gemm_size)


def best_rates(first: MachineRates, second: MachineRates) -> MachineRates:
    """Each rate's better measurement: on a shared machine a low figure means the cores were
    busy elsewhere at that moment, not that the hardware is slower."""
    return MachineRates(
        max(first.read_gb_s, second.read_gb_s),
        max(first.copy_gb_s, second.copy_gb_s),
        max(first.gemm_gflop_s, second.gemm_gflop_s),
        first.threads,
        first.buffer_mib,
        first.gemm_size,
    )


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class DecoderCost:
    """What the decoder graph must read and compute. Parameter counts, not bytes."""

    layer_params: int  # every decoder layer + the final norm (embeddings excluded)
    lm_head_params: int
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: str  # the graph's: "float32" | "float16"
    bytes_per_weight: float | None = None  # weight-quantized graphs (--quant): less than the dtype's

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step reads: each weight once, whatever the batch."""
        per_weight = self.bytes_per_weight or BYTES_PER_ELEMENT[self.dtype]
        return round((self.layer_params + self.lm_head_params) * per_weight)

    def prefill_flops(self, tokens: int, batch: int = 1) -> float:
        """One forward over `tokens` positions per sequence, logits at the last one only."""
        linear = 2.0 * self.layer_params * tokens * batch + 2.0 * self.lm_head_params * batch
        return linear + self.attention_flops(tokens, batch)

    def attention_flops(self, tokens: int, batch: int = 1) -> float:
        """Causal QK^T and AV: each 2 * head_dim FLOPs per (query, key <= query) pair."""
        pairs = tokens * (tokens + 1) / 2
        return 2 * 2.0 * self.head_dim * pairs * self.num_heads * self.num_layers * batch

    def decode_flops(self, context: int, batch: int = 1) -> float:
        """One new token per sequence attending to `context` positions (itself included)."""
        linear = 2.0 * (self.layer_params + self.lm_head_params) * batch
        return linear + 2 * 2.0 * self.head_dim * context * self.num_heads * self.num_layers * batch


@dataclass
class VisionCost:
    """What the vision graph must compute for one image."""

    patch_params: int  # the patch-embedding convolution
    layer_params: int  # the tower's layers up to the selected one, summed
    projector_params: int
    num_layers: int  # layers up to the selected one
    num_heads: int
    head_dim: int
    tower_tokens: int  # patches + CLS
    image_tokens: int  # what the projector sees (CLS dropped or kept), per tile
    tiles: int = 1  # tower runs per image: 1, or an anyres image's base tile and grid

    def flops(self, batch: int = 1) -> float:
        patches = self.tower_tokens - 1
        embed = 2.0 * self.patch_params * patches
        layers = 2.0 * self.layer_params * self.tower_tokens
        attention = (
            2 * 2.0 * self.head_dim * self.tower_tokens**2 * self.num_heads * self.num_layers
        )  # not causal
        projector = 2.0 * self.projector_params * self.image_tokens
        return (embed + layers + attention + projector) * self.tiles * batch


# ---------------------------------------------------------------------------------------------
# The bound


@dataclass
class Phase:
    """One phase's bound: the memory and compute terms and the larger of them."""

    bytes: float
    flops: float
    memory_ms: float
    compute_ms: float

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)

    @property
    def bound_by(self) -> str:
        return "memory" if self.memory_ms >= self.compute_ms else "compute"

    def as_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "flops": self.flops,
            "memory_ms": round(self.memory_ms, 4),
            "compute_ms": round(self.compute_ms, 4),
            "ms": round(self.ms, 4),
            "bound_by": self.bound_by,
        }


def phase(machine: MachineRates, nbytes: float, flops: float) -> Phase:
    return Phase(
        nbytes, flops, nbytes / (machine.read_gb_s * 1e9) * 1e3, flops / (machine.gemm_gflop_s * 1e9) * 1e3
    )


@dataclass
class Roofline:
    image_encode: Phase
    prefill: Phase
    decode_step: Phase  # one step at the mean context of the run
    batch: int
    new_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / (self.decode_step.ms / 1e3)

    @property
    def end_to_end_ms(self) -> float:
        return self.image_encode.ms + self.prefill.ms + self.new_tokens * self.decode_step.ms

    def as_dict(self) -> dict:
        return {
            "image_encode": self.image_encode.as_dict(),
            "prefill": self.prefill.as_dict(),
            "decode_step": self.decode_step.as_dict(),
            "image_encode_ms": round(self.image_encode.ms, 4),
            "prefill_ms": round(self.prefill.ms, 4),
            "decode_ms_per_step": round(self.decode_step.ms, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "end_to_end_ms": round(self.end_to_end_ms, 4),
        }


def roofline(
    machine: MachineRates,
    decoder: DecoderCost,
    vision: VisionCost | None,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    vision_dtype: str = "float32",
) -> Roofline:
    """Bounds for a run: `batch` images encoded, a `prompt_tokens` prefill per sequence, then
    `new_tokens` decode steps (each reads the decoder weights once for the whole batch).
    `vision` None: no image (llava-bench --decoder-only)."""
    image_encode = phase(machine, 0, 0)
    if vision is not None:
        params = vision.patch_params + vision.layer_params + vision.projector_params
        image_encode = phase(machine, params * BYTES_PER_ELEMENT[vision_dtype], vision.flops(batch))
    mean_context = prompt_tokens + (new_tokens + 1) / 2  # step i attends to prompt + i positions
    return Roofline(
        image_encode=image_encode,
        prefill=phase(machine, decoder.weight_bytes, decoder.prefill_flops(prompt_tokens, batch)),
        decode_step=phase(machine, decoder.weight_bytes, decoder.decode_flops(round(mean_context), batch)),
        batch=batch,
        new_tokens=new_tokens,
    )
