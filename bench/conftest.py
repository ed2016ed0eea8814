"""pytest configuration for ``pytest bench/ --benchmark-only`` (not part of ``make test``).

Collects the ``bench_*.py`` files (pytest's default pattern is ``test_*.py``), runs Triton on
the CPU through its interpreter, and flushes denormals like the test suite.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)
if os.environ.get("RF_BENCH_THREADS"):  # e.g. RF_BENCH_THREADS=1 on a shared machine
    torch.set_num_threads(int(os.environ["RF_BENCH_THREADS"]))


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
