"""Comparing an artifact's outputs with the PyTorch reference.

Every output is measured (max abs error, min cosine along the last axis), all failures are
collected, and one ParityError lists them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import LlavaError

# The export-time gate, per graph dtype: min cosine of every row (image token, logits row, ...).
MIN_COSINE = {"float32": 0.9999, "float16": 0.999}
# Weight-only quantized decoders (--quant), whatever their float dtype. The reference then
# carries the graph's own (quantized) weights, so this gates the graph, not the rounding; it is
# looser than float32 because MatMulNBits (accuracy level 4) also rounds each block of
# activations to int8, and w8a8 each token's. What the rounding of the weights costs is reported beside it (cosine and
# top-1 agreement against the unquantized weights), not gated: random-weight test models
# amplify every layer's error (docs/benchmarks.md, "Quantization"), trained models much less;
# their quality is the evaluation's job.
QUANT_MIN_COSINE = {"int8": 0.99, "int4": 0.99, "w8a8": 0.99}


def min_cosine_for(dtype_name: str, quant: str | None = None) -> float:
    """The gate for a graph of `dtype_name` (float32 | float16), weight-quantized or not."""
    return QUANT_MIN_COSINE[quant] if quant else MIN_COSINE[dtype_name]


class ParityError(LlavaError, AssertionError):
    """One or more outputs differ from the reference beyond tolerance. A LlavaError, so the
    CLI prints the report without a traceback; an AssertionError, so tests read naturally."""


@dataclass
class OutputParity:
    name: str
    max_abs_err: float
    min_cosine: float
    ok: bool
    top1: float | None = None  # fraction of rows whose argmax agrees (reported, not gated)
    gated: bool = True  # False: a figure reported beside the gate (ok regardless)

    def line(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        agreement = f", top-1 agreement {self.top1:.0%}" if self.top1 is not None else ""
        return f"{self.name}: max abs err {self.max_abs_err:.3g}, min cosine {self.min_cosine:.6f}{agreement} [{mark}]"


def cosine_rows(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row along the last axis; rows that are both zero count as 1."""
    a = actual.astype(np.float64).reshape(-1, actual.shape[-1])
    e = expected.astype(np.float64).reshape(-1, expected.shape[-1])
    dot = (a * e).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))


def compare(
    name: str,
    actual: np.ndarray,
    expected: np.ndarray,
    atol: float | None = None,
    min_cosine: float | None = None,
    top1: bool = False,
) -> OutputParity:
    """Measures one output; ok when within `atol` (if given) and above `min_cosine` (if given).
    `top1`: also report how many rows' argmax along the last axis agree (logits)."""
    if actual.shape != expected.shape:
        return OutputParity(name, float("inf"), -1.0, False)
    actual = actual.astype(np.float32)
    expected = expected.astype(np.float32)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    cos = float(cosine_rows(actual, expected).min()) if actual.size else 1.0
    ok = (
        np.isfinite(actual).all()
        and (atol is None or err <= atol)
        and (min_cosine is None or cos >= min_cosine)
    )
    agreement = None
    if top1 and actual.size:
        agreement = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    return OutputParity(name, err, cos, bool(ok), agreement)


def assert_parity(results: list[OutputParity], context: str = "") -> None:
    failures = [r for r in results if not r.ok]
    if failures:
        header = f"parity failed{' (' + context + ')' if context else ''}: {len(failures)} of {len(results)} outputs"
        raise ParityError("\n".join([header] + ["  " + r.line() for r in results]))


def summary(results: list[OutputParity]) -> dict[str, float]:
    """The figures the manifest records: worst error and worst cosine over all gated outputs;
    with reported (ungated) ones, their worst cosine and mean top-1 agreement too."""
    gated = [r for r in results if r.gated]
    if not gated:
        return {}
    figures = {
        "max_abs_err": max(r.max_abs_err for r in gated),
        "min_cosine": min(r.min_cosine for r in gated),
    }
    reported = [r for r in results if not r.gated]  # a quantized graph's logits vs unquantized weights
    if reported:
        figures["unquantized_min_cosine"] = min(r.min_cosine for r in reported)
    agreements = [r.top1 for r in reported if r.top1 is not None]
    if agreements:  # over every compared logits output (same row count each: the mean)
        figures["unquantized_top1_agreement"] = sum(agreements) / len(agreements)
    return figures


def report(progress, graph: str, results: list[OutputParity]) -> None:
    """One line per graph (the worst output), plus every output that failed."""
    worst = summary(results)
    status = "ok" if all(r.ok for r in results) else "FAILED"
    gated = [r for r in results if r.gated]
    progress.say(
        f"  parity {graph} vs PyTorch: max abs err {worst['max_abs_err']:.3g}, "
        f"min cosine {worst['min_cosine']:.6f} over {len(gated)} outputs [{status}]"
    )
    if "unquantized_min_cosine" in worst:
        agreement = worst.get("unquantized_top1_agreement")
        progress.say(
            f"  quantization effect: logits vs the unquantized weights: min cosine {worst['unquantized_min_cosine']:.4f}"
            + (f", top-1 agreement {agreement:.0%}" if agreement is not None else "")
            + " (reported, not gated)"
        )
    for result in results:
        if not result.ok:
            progress.say("    " + result.line())
