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


class ParityError(LlavaError, AssertionError):
    """One or more outputs differ from the reference beyond tolerance. A LlavaError, so the
    CLI prints the report without a traceback; an AssertionError, so tests read naturally."""


@dataclass
class OutputParity:
    name: str
    max_abs_err: float
    min_cosine: float
    ok: bool

    def line(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return f"{self.name}: max abs err {self.max_abs_err:.3g}, min cosine {self.min_cosine:.6f} [{mark}]"


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
) -> OutputParity:
    """Measures one output; ok when within `atol` (if given) and above `min_cosine` (if given)."""
    if actual.shape != expected.shape:
        return OutputParity(name, float("inf"), -1.0, False)
    actual = actual.astype(np.float32)
    expected = expected.astype(np.float32)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    cos = float(cosine_rows(actual, expected).min()) if actual.size else 1.0
    ok = np.isfinite(actual).all() and (atol is None or err <= atol) and (min_cosine is None or cos >= min_cosine)
    return OutputParity(name, err, cos, bool(ok))


def assert_parity(results: list[OutputParity], context: str = "") -> None:
    failures = [r for r in results if not r.ok]
    if failures:
        header = f"parity failed{' (' + context + ')' if context else ''}: {len(failures)} of {len(results)} outputs"
        raise ParityError("\n".join([header] + ["  " + r.line() for r in results]))


def summary(results: list[OutputParity]) -> dict[str, float]:
    """The figures the manifest records: worst error and worst cosine over all outputs."""
    if not results:
        return {}
    return {
        "max_abs_err": max(r.max_abs_err for r in results),
        "min_cosine": min(r.min_cosine for r in results),
    }


def report(progress, graph: str, results: list[OutputParity]) -> None:
    """One line per graph (the worst output), plus every output that failed."""
    worst = summary(results)
    status = "ok" if all(r.ok for r in results) else "FAILED"
    progress.say(
        f"  parity {graph} vs PyTorch: max abs err {worst['max_abs_err']:.3g}, "
        f"min cosine {worst['min_cosine']:.6f} over {len(results)} outputs [{status}]"
    )
    for result in results:
        if not result.ok:
            progress.say("    " + result.line())
