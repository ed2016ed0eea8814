"""Timing, memory and reporting helpers shared by the benchmark scripts.

Rules every benchmark here follows:

- Variants being compared run **interleaved in one process** (round-robin, with the order
  rotated every round so no variant always runs first or last), after warm-up calls.
- Results are the **median** of the samples with the **interquartile range** as the spread;
  ratios are computed from medians measured side by side in the same run.
- On CUDA every sample is bracketed by ``torch.cuda.synchronize()``.
- Memory: peak RSS from ``/proc/self/status`` (``VmHWM``; reset through ``/proc/self/clear_refs``
  where the kernel allows it), or ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stats:
    """Summary of repeated timings of one variant (seconds per call)."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def quantile(self, q: float) -> float:
        if not self.samples:
            return math.nan
        xs = sorted(self.samples)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def q1(self) -> float:
        return self.quantile(0.25)

    @property
    def q3(self) -> float:
        return self.quantile(0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR relative to the median (0.05 = the middle half of samples spans 5% of the median)."""
        return self.iqr / self.median if self.median > 0 else math.nan

    def rate(self, work: float) -> float:
        """``work`` units per second at the median time."""
        return work / self.median if self.median > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "iqr_rel": self.rel_iqr, "n": self.n}


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    min_time_s: float = 0.0,
) -> dict[str, Stats]:
    """Time every callable in ``fns`` round-robin, ``rounds`` samples each, after ``warmup`` calls.

    A callable may return a float: it is then taken as the sample (seconds), which lets a
    callable exclude its own set-up (e.g. a decode benchmark excluding the prefill). Otherwise
    the wall time of the call is the sample. The order is rotated every round.
    ``min_time_s``: a sample repeats the call until at least this much time passed and
    records the mean per call (for very short calls).
    """
    names = list(fns)
    stats = {n: Stats(n) for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2 == 1:
            order = order[::-1]
        for n in order:
            stats[n].samples.append(_one_sample(fns[n], device, min_time_s))
    return stats


def _one_sample(fn: Callable[[], Any], device, min_time_s: float) -> float:
    calls, inner = 0, 0.0
    sync(device)
    t0 = time.perf_counter()
    while True:
        out = fn()
        calls += 1
        if isinstance(out, float):
            inner += out
        if time.perf_counter() - t0 >= min_time_s:
            break
    sync(device)
    total = time.perf_counter() - t0
    return (inner if inner > 0 else total) / calls


# ---------------------------------------------------------------------------- memory
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB (``VmRSS``; nan if /proc is missing)."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else math.nan


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``)."""
    kb = _proc_status_kb("VmHWM")
    return kb / 1024 if kb is not None else math.nan


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- environment
def git_commit() -> str:
    """Short commit hash of the repository (with ``+dirty`` when the tree has changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # tracked changes anywhere, or untracked files in the code directories
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = dirty or subprocess.run(
            ["git", "status", "--porcelain", "--", "refusal_fast", "kernels", "csrc", "bench", "setup.py",
             ":!bench/results"],
            cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, library and backend facts recorded with every result."""
    from refusal_fast import __version__

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "refusal_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        from refusal_fast.ops import backend_info

        info["backends"] = backend_info()
    except Exception as exc:  # noqa: BLE001 - the bench records what it could not import
        info["backends"] = f"unavailable: {type(exc).__name__}: {exc}"
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- output
def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (3 significant digits, thousands separators)."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   headers: Mapping[str, str] | None = None) -> str:
    """GitHub Markdown table of ``rows`` (dicts) over ``columns`` (default: keys of the first row)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    headers = headers or {}
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """CSV with the union of the rows' keys as columns (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    import io

    from refusal_fast.artifacts import write_text

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    write_text(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN/inf written as null), atomically: :func:`refusal_fast.artifacts.write_json`."""
    from refusal_fast.artifacts import write_json as _write_json

    _write_json(path, obj)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cycle_to(xs: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` items of ``xs`` repeated cyclically (benchmark prompt sets larger than a dataset)."""
    if not xs:
        raise ValueError("empty sequence")
    return [xs[i % len(xs)] for i in range(n)]
