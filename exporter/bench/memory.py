"""Resident memory per side, for `llava-bench` (Linux: /proc; zeros elsewhere).

Both sides live in one process, so a side's figure is what it added: the growth while loading,
and the peak above the resident size it started a run at. The peak is the kernel's high-water
mark (VmHWM), reset before each phase by writing 5 to /proc/self/clear_refs; where that is
refused, the resident size sampled after the phase stands in for it (a lower bound).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SideMemory:
    """MiB this side added: `resident` after loading, `load_peak` while loading, and the
    largest peak above the pre-run resident size during a run (`run_peak`)."""

    resident: float = 0.0
    load_peak: float = 0.0
    run_peak: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.load_peak, self.resident + self.run_peak)


class RssMeter:
    """This process's resident memory in MiB."""

    def __init__(self):
        self.available = Path("/proc/self/statm").is_file()
        self.resettable = self.available and self.reset_peak()
        self.sampled_peak = 0.0

    @property
    def method(self) -> str:
        if not self.available:
            return "unavailable (no /proc)"
        if self.resettable:
            return "VmHWM, reset via /proc/self/clear_refs before each phase"
        return "resident size sampled after each phase (peak not resettable: a lower bound)"

    def current(self) -> float:
        if not self.available:
            return 0.0
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def reset_peak(self) -> bool:
        self.sampled_peak = 0.0
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def peak(self) -> float:
        if not self.available:
            return 0.0
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        self.sampled_peak = max(self.sampled_peak, self.current())
        return self.sampled_peak

    def loading(self, load):
        """(load(), the SideMemory it added: resident growth and peak while loading)."""
        base = self.current()
        self.reset_peak()
        loaded = load()
        return loaded, SideMemory(self.current() - base, self.peak() - base)

    def peak_above_start(self, work, *args):
        """(work(*args), its peak MiB above the resident size it started at)."""
        start = self.current()
        self.reset_peak()
        result = work(*args)
        return result, self.peak() - start
