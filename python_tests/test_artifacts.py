"""refusal_fast.artifacts: the one writer / reader (atomic writes, JSON policy, checksummed tensor files with
sidecars, verification, the output-directory lock, the writability probe)."""
import dataclasses
import json
import math
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_fast import artifacts as art


def _strict_loads(text: str):
    def bad(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------- JSON


@dataclasses.dataclass
class _DC:
    x: float
    t: torch.Tensor


class _WithToDict:
    def to_dict(self):
        return {"a": float("inf")}


def test_one_json_policy(tmp_path):
    obj = {"nan": math.nan, "inf": -math.inf, "t": torch.tensor([1.5, float("nan")]), "bf": torch.tensor([0.1],
           dtype=torch.bfloat16), "np": np.array([[1, 2]]), "npf": np.float32(0.25), "npi": np.int64(7),
           "npnan": np.float64("nan"), "path": Path("/x/y"), "dtype": torch.float16, "dev": torch.device("cpu"),
           "set": {3, 1}, "tuple": (1, 2), "dc": _DC(2.0, torch.tensor(3)), "obj": _WithToDict(), 5: "int key"}
    p = art.write_json(tmp_path / "a" / "b.json", obj)
    d = _strict_loads(p.read_text())
    assert d["nan"] is None and d["inf"] is None and d["t"] == [1.5, None] and d["npnan"] is None
    assert d["bf"] == [float(torch.tensor(0.1, dtype=torch.bfloat16))]
    assert d["np"] == [[1, 2]] and d["npf"] == 0.25 and d["npi"] == 7 and d["path"] == "/x/y"
    assert d["dtype"] == "float16" and d["dev"] == "cpu" and d["set"] == [1, 3] and d["tuple"] == [1, 2]
    assert d["dc"] == {"x": 2.0, "t": 3} and d["obj"] == {"a": None} and d["5"] == "int key"
    with pytest.raises(TypeError, match="not JSON serialisable"):
        art.write_json(tmp_path / "c.json", {"o": object()})
    assert not (tmp_path / "c.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.json"):
        art.read_json(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(art.ArtifactError, match="bad.json.*not valid JSON"):
        art.read_json(tmp_path / "bad.json")
    with pytest.raises(art.ArtifactError, match="is a directory"):
        art.read_json(tmp_path)


# ---------------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_the_old_file(tmp_path):
    p = art.write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with art.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_written_files_have_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    p = art.write_text(tmp_path / "atomic", "x")
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_writing_onto_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(art.ArtifactError, match="is a directory"):
        art.write_text(tmp_path / "d", "x")


# ----------------------------------------------------------------------------------- tensor files


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"f64": torch.randn(3, 5, generator=g, dtype=torch.float64), "bf16": torch.randn(7, generator=g).bfloat16(),
            "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(6).reshape(2, 3),
            "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
            "view": torch.randn(4, 6, generator=g)[:, ::2]}


def test_tensor_roundtrip_and_integrity_record(tmp_path):
    ts = _tensors()
    meta = {"b": [1, 2], "a": {"nested": math.nan}}
    p = art.save_tensors(tmp_path / "x.safetensors", ts, meta, kind="test.kind", version=3)
    got, m = art.load_tensors(p, kind="test.kind", max_version=3)
    assert set(got) == set(ts)
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    assert m == {"b": [1, 2], "a": {"nested": None}}
    assert art.read_metadata(p) == m
    assert json.loads((tmp_path / "x.json").read_text()) == m  # the sidecar: the same document
    assert art.verify(p) == {"path": str(p), "kind": "test.kind", "version": 3, "tensors": len(ts), "sidecar": "ok"}
    with pytest.raises(art.ArtifactError, match="not a test.other"):
        art.load_tensors(p, kind="test.other", what="test.other")
    with pytest.raises(art.ArtifactError, match="newer than this library"):
        art.load_tensors(p, max_version=2)


def test_tensor_checksum_and_header_checks(tmp_path):
    p = art.save_tensors(tmp_path / "x.safetensors", {"a": torch.arange(100, dtype=torch.float32)}, {"m": 1},
                         kind="k")
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n + 50] ^= 1
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(art.ArtifactError, match=r"flip.safetensors: tensor 'a' fails its sha256 checksum"):
        art.load_tensors(tmp_path / "flip.safetensors")
    header = bytes(raw[8:8 + n]).replace(b'\\"m\\": 1', b'\\"m\\": 2')  # edit the metadata text
    assert header != bytes(raw[8:8 + n])
    (tmp_path / "meta.safetensors").write_bytes(bytes(raw[:8]) + header + p.read_bytes()[8 + n:])
    with pytest.raises(art.ArtifactError, match="metadata fails its sha256"):
        art.read_metadata(tmp_path / "meta.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(art.ArtifactError, match="no refusal-fast integrity record"):
        art.load_tensors(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(art.ArtifactError, match="junk.safetensors is not a readable safetensors file"):
        art.load_tensors(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        art.load_tensors(tmp_path / "nope.safetensors")


def test_sidecar_never_describes_another_version(tmp_path):
    p = art.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"v": 1}, kind="k")
    side = art.sidecar_path(p)
    side.write_text(json.dumps({"v": 0}))  # stale / edited copy
    with pytest.raises(art.ArtifactError, match="does not match the header.*rewrite_sidecar"):
        art.verify(p)
    art.rewrite_sidecar(p)
    assert art.verify(p)["sidecar"] == "ok"
    art.save_tensors(p, {"a": torch.ones(1)}, {"v": 2}, kind="k", sidecar=False)  # old sidecar removed first
    assert not side.exists() and art.verify(p)["sidecar"] == "absent"
    assert art.sidecar_path("x") == Path("x.json") and art.sidecar_path("a/b.st") == Path("a/b.json")


# ------------------------------------------------------------------------------ output directories


def test_check_writable(tmp_path):
    d = art.check_writable(tmp_path / "new" / "deeper")
    assert d.is_dir() and list(d.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(art.ArtifactError, match="cannot create"):
        art.check_writable(tmp_path / "file" / "sub")
    with pytest.raises(art.ArtifactError, match="not a directory"):
        art.check_writable(tmp_path / "file")


def test_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    with art.locked_directory(tmp_path, owner="test run"):
        with pytest.raises(art.OutputLockedError, match=f"in use by another refusal-fast run \\(pid {os.getpid()}: "
                                                        "test run"):
            with art.locked_directory(tmp_path):
                pass
    with art.locked_directory(tmp_path):  # released on exit
        pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a holder that is SIGKILLed while holding the lock
        try:
            with art.locked_directory(tmp_path, owner="doomed"):
                os.write(w, b"1")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    with pytest.raises(art.OutputLockedError, match="doomed"):
        with art.locked_directory(tmp_path):
            pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with art.locked_directory(tmp_path):  # the kernel released it with the process
        pass
