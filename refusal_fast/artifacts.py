"""The one writer and reader of refusal-fast's artifacts (JSON, HTML, safetensors + JSON sidecar).

Everything the package writes to disk goes through this module, so every artifact gets the same
guarantees:

- **Atomic writes.** Content goes to a unique temporary file in the target's directory
  (``.<name>.<random>.tmp``), is flushed and ``fsync``-ed, then ``os.replace``-d over the target,
  and the directory is ``fsync``-ed. A reader sees the old file or the new one, never half a file;
  two writers of one path never collide on a temporary name. A killed writer can leave a
  ``.*.tmp`` file behind; it is never read and may be deleted.
- **One JSON policy.** :func:`to_jsonable` converts tensors / NumPy arrays to lists, NumPy
  scalars to numbers, paths and dtypes to strings, objects with ``to_dict()`` and dataclasses to
  dicts, and NaN / inf to ``null``; the text is strict JSON (``allow_nan=False``).
- **Tensor files that verify themselves.** :func:`save_tensors` writes a safetensors file whose
  header holds the metadata document (key ``"refusal_fast"``) and an integrity record (key
  ``"refusal_fast.integrity"``: artifact kind and version, sha256 of the metadata text, and each
  tensor's dtype, shape and sha256). :func:`load_tensors` checks all of it and raises
  :class:`ArtifactError` naming the file and what to do. The header is authoritative; the ``.json``
  sidecar beside it is a human-readable copy. The sidecar is deleted *before* the tensor file is
  replaced and written *after* it, so a sidecar on disk always matches its tensor file (after a
  crash it may be missing; :func:`rewrite_sidecar` restores it). :func:`verify` checks a file and
  its sidecar.
- **Output directories.** :func:`check_writable` creates and removes a probe file (used before a
  model is loaded, so a bad path fails in seconds, not after the compute); :func:`locked_directory`
  holds an advisory ``fcntl.flock`` lock on ``<dir>/.refusal-fast.lock`` so two CLI runs never
  write into one directory at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ArtifactError", "OutputLockedError", "library_version",
    "to_jsonable", "dumps_json", "write_json", "read_json", "write_text", "write_bytes", "write_figure", "atomic_path",
    "tensor_sha256", "sidecar_path", "save_tensors", "load_tensors", "read_metadata", "verify",
    "rewrite_sidecar", "check_writable", "locked_directory", "LOCK_NAME",
]

META_KEY = "refusal_fast"
INTEGRITY_KEY = "refusal_fast.integrity"
INTEGRITY_VERSION = 1
LOCK_NAME = ".refusal-fast.lock"


class ArtifactError(ValueError):
    """An artifact that cannot be written, read or verified; the message names the file and the fix."""


class OutputLockedError(ArtifactError):
    """Another process holds the lock on an output directory (see :func:`locked_directory`)."""


def library_version() -> str:
    """refusal-fast version: ``refusal_fast.__version__``, the one source the package metadata reads."""
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(path: Path) -> Path:
    """Create an empty, uniquely named temporary file beside ``path`` (mode 0666 minus the umask)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        os.close(fd)
        return tmp
    raise ArtifactError(f"could not create a temporary file beside {path}")  # pragma: no cover


def _prepare_target(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArtifactError(f"cannot write {p}: it is a directory; give a file path inside it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the directory of {p}: {exc.strerror or exc}") from None
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it is fsync-ed and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Parent directories
    are created.
    """
    target = _prepare_target(path)
    try:
        tmp = _new_temp(target)
    except OSError as exc:
        raise ArtifactError(f"cannot write {target}: {exc.strerror or exc} (is the directory writable?)") from None
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Render a matplotlib figure (PNG unless ``format=`` says otherwise) and write it atomically."""
    import io

    buf = io.BytesIO()
    savefig_kwargs.setdefault("format", "png")
    fig.savefig(buf, **savefig_kwargs)
    return write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# JSON


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: the package's one conversion policy.

    Tensors and NumPy arrays become nested lists, NumPy scalars numbers, NaN / inf ``None``,
    ``Path`` / ``torch.dtype`` / ``torch.device`` strings, mapping keys strings, tuples and sets
    lists; objects with a ``to_dict()`` method and dataclasses become dicts.

    Raises:
        TypeError: an object of another type ("... is not JSON serialisable").
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if type(obj).__module__ == "numpy" or type(obj).__module__.startswith("numpy."):
        if hasattr(obj, "tolist"):  # arrays and scalars
            return to_jsonable(obj.tolist())
    if callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of ``to_jsonable(obj)`` (no NaN / Infinity tokens)."""
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_jsonable`) to ``path`` atomically; returns the path."""
    return write_text(path, dumps_json(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse the JSON file ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: it is a directory, not UTF-8, or not valid JSON (the message names the file).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArtifactError(f"{what} {p} is a directory, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} {p} is not valid JSON ({exc}); it is truncated or corrupt") from None


# --------------------------------------------------------------------------------------------
# tensors + sidecar


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in C order (its dtype's own bytes, on the CPU)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a tensor file: ``X.safetensors`` -> ``X.json`` (``X`` -> ``X.json``)."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix and p.suffix != ".json" else p.with_name(p.name + ".json")


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], *,
                 kind: str, version: int = 1, sidecar: bool = True) -> Path:
    """Write ``tensors`` with ``metadata`` as a self-verifying safetensors file (+ a ``.json`` sidecar).

    Args:
        path: target file (parent directories are created).
        tensors: ``{name: tensor}``; saved from the CPU, contiguous, in their own dtype.
        metadata: JSON-able provenance, stored in the header (authoritative) and in the sidecar.
        kind: artifact kind, e.g. ``"refusal_fast.means"``; :func:`load_tensors` can demand it.
        version: the kind's format version.
        sidecar: also write ``sidecar_path(path)`` (an existing sidecar is removed either way).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    target = _prepare_target(path)
    ts = {str(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta_text = dumps_json(metadata, indent=None, sort_keys=True)
    integrity = {
        "integrity_version": INTEGRITY_VERSION, "kind": kind, "version": int(version),
        "library_version": library_version(),
        "metadata_sha256": hashlib.sha256(meta_text.encode("utf-8")).hexdigest(),
        "tensors": {k: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": tensor_sha256(t)}
                    for k, t in ts.items()},
    }
    side = sidecar_path(target)
    if side != target:
        with contextlib.suppress(FileNotFoundError):
            side.unlink()  # never leave a sidecar that describes another version of the tensor file
    with atomic_path(target) as tmp:
        save_file(ts, str(tmp), metadata={META_KEY: meta_text, INTEGRITY_KEY: json.dumps(integrity, sort_keys=True)})
    if sidecar and side != target:
        write_json(side, metadata)  # the same document, in the caller's key order
    return target


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArtifactError(f"{what} path {p} is a directory; pass the .safetensors file itself")
    if not p.exists():
        raise FileNotFoundError(f"no such {what} file: {p}")
    return p


def _header(p: Path, f, what: str) -> tuple[dict, dict]:
    """(metadata, integrity) of an open safetensors file, both checked."""
    header = f.metadata() or {}
    if INTEGRITY_KEY not in header or META_KEY not in header:
        raise ArtifactError(
            f"{p} has no refusal-fast integrity record (written by an older refusal-fast or by another "
            f"program), so its contents cannot be verified; re-create the {what} with this version"
        )
    try:
        integrity = json.loads(header[INTEGRITY_KEY])
        meta_text = header[META_KEY]
        meta = json.loads(meta_text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}: the header metadata is not valid JSON ({exc}); the file is corrupt, "
                            f"re-create the {what}") from None
    if not isinstance(integrity, dict) or not isinstance(meta, dict) or not isinstance(integrity.get("tensors"), dict):
        raise ArtifactError(f"{p}: malformed refusal-fast header; the file is corrupt, re-create the {what}")
    if int(integrity.get("integrity_version", 0)) > INTEGRITY_VERSION:
        raise ArtifactError(f"{p} was written by a newer refusal-fast (integrity version "
                            f"{integrity.get('integrity_version')}); upgrade refusal-fast to read it")
    if hashlib.sha256(meta_text.encode("utf-8")).hexdigest() != integrity.get("metadata_sha256"):
        raise ArtifactError(f"{p}: the header metadata fails its sha256 checksum; the file is corrupt, "
                            f"re-create the {what}")
    return meta, integrity


def _open(p: Path, what: str):
    from safetensors import safe_open

    try:
        return safe_open(str(p), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike: a bad file
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ArtifactError(f"{p} is not a readable safetensors file ({msg}); it is truncated or corrupt: "
                            f"delete it and re-create the {what}") from None


def _check_kind(p: Path, integrity: dict, kind: str | None, max_version: int | None, what: str) -> None:
    if kind is not None and integrity.get("kind") != kind:
        raise ArtifactError(f"{p} holds a {integrity.get('kind')!r} artifact, not a {what} ({kind!r})")
    if max_version is not None and int(integrity.get("version", 0)) > max_version:
        raise ArtifactError(f"{p}: {what} format version {integrity.get('version')} is newer than this "
                            f"library's {max_version}; upgrade refusal-fast")


def load_tensors(path: str | os.PathLike, *, kind: str | None = None, max_version: int | None = None,
                 what: str = "artifact") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`save_tensors`.

    Checks the integrity record (present, not newer than this library), the kind and version (if
    given), the metadata checksum, that the tensor names match the record, and each tensor's dtype,
    shape and sha256.

    Returns:
        ``(tensors on the CPU, metadata)``.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: a directory, a truncated / corrupt / foreign file, a failed checksum, or the
            wrong kind; the message names the file and what to do.
    """
    p = _check_file(path, what)
    with _open(p, what) as f:
        meta, integrity = _header(p, f, what)
        _check_kind(p, integrity, kind, max_version, what)
        want = integrity["tensors"]
        have = set(f.keys())
        if have != set(want):
            raise ArtifactError(f"{p}: tensors {sorted(have)} do not match its integrity record {sorted(want)}; "
                                f"the file is corrupt, re-create the {what}")
        tensors = {}
        for name in sorted(have):
            try:
                t = f.get_tensor(name)
            except Exception as exc:  # noqa: BLE001
                raise ArtifactError(f"{p}: cannot read tensor {name!r} ({exc}); the file is truncated or corrupt, "
                                    f"re-create the {what}") from None
            rec = want[name]
            if _dtype_name(t) != rec.get("dtype") or list(t.shape) != rec.get("shape"):
                raise ArtifactError(f"{p}: tensor {name!r} is {_dtype_name(t)} {list(t.shape)} but its record says "
                                    f"{rec.get('dtype')} {rec.get('shape')}; the file is corrupt, re-create the {what}")
            digest = tensor_sha256(t)
            if digest != rec.get("sha256"):
                raise ArtifactError(
                    f"{p}: tensor {name!r} fails its sha256 checksum (recorded {str(rec.get('sha256'))[:12]}..., "
                    f"computed {digest[:12]}...); the file is corrupt: delete it and re-create the {what}"
                )
            tensors[name] = t
    return tensors, meta


def read_metadata(path: str | os.PathLike, *, kind: str | None = None, what: str = "artifact") -> dict[str, Any]:
    """The header metadata of a :func:`save_tensors` file (metadata checksum verified, tensors not read)."""
    p = _check_file(path, what)
    with _open(p, what) as f:
        meta, integrity = _header(p, f, what)
        _check_kind(p, integrity, kind, None, what)
    return meta


def verify(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Fully check a tensor file and its sidecar.

    Returns:
        ``{"path", "kind", "version", "tensors": n, "sidecar": "ok" | "absent"}``.

    Raises:
        ArtifactError: the file fails :func:`load_tensors`, or the sidecar is not valid JSON or
            differs from the header metadata (fix: :func:`rewrite_sidecar`).
    """
    p = _check_file(path, "artifact")
    tensors, meta = load_tensors(p, kind=kind)
    with _open(p, "artifact") as f:
        _, integrity = _header(p, f, "artifact")
    side = sidecar_path(p)
    status = "absent"
    if side.exists():
        try:
            side_meta = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"sidecar {side} is not valid JSON ({exc}); the header of {p} is authoritative: "
                                f"restore it with refusal_fast.artifacts.rewrite_sidecar('{p}')") from None
        if side_meta != meta:
            raise ArtifactError(f"sidecar {side} does not match the header of {p}; the header is authoritative: "
                                f"restore it with refusal_fast.artifacts.rewrite_sidecar('{p}')")
        status = "ok"
    return {"path": str(p), "kind": integrity.get("kind"), "version": integrity.get("version"),
            "tensors": len(tensors), "sidecar": status}


def rewrite_sidecar(path: str | os.PathLike) -> Path:
    """Re-create the JSON sidecar of a tensor file from its (verified) header; returns the sidecar path."""
    p = _check_file(path, "artifact")
    _, meta = load_tensors(p)
    return write_json(sidecar_path(p), meta)


# --------------------------------------------------------------------------------------------
# output directories


def check_writable(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``directory`` if needed and prove it writable by creating and removing a probe file.

    Call it before loading a model, so a bad path fails at once instead of after the compute.

    Raises:
        ArtifactError: the directory cannot be created, is not a directory, or is not writable.
    """
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise ArtifactError(f"the {what} {d} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the {what} {d}: {exc.strerror or exc}; choose another path") from None
    if not d.is_dir():
        raise ArtifactError(f"the {what} {d} is not a directory")
    probe = d / f".refusal-fast-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        raise ArtifactError(f"the {what} {d} is not writable ({exc.strerror or exc}); choose a directory you can "
                            f"write to") from None
    return d


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike, owner: str = "refusal-fast") -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``directory`` (``fcntl.flock`` on ``<directory>/.refusal-fast.lock``).

    The lock is released when the block exits or the process dies (also on ``SIGKILL``). ``owner``
    is written into the lock file and shown to a process that finds the directory locked. On
    platforms without ``fcntl`` the block runs unlocked.

    Raises:
        OutputLockedError: another process holds the lock.
    """
    d = check_writable(directory)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield d
        return
    lock = d / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text(encoding="utf-8", errors="replace").strip() or "unknown process"
            raise OutputLockedError(
                f"{d} is in use by another refusal-fast run ({holder}); wait for it to finish, or give this run "
                f"another output directory (--out)"
            ) from None
        now = _dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {owner}, since {now}\n".encode())
        yield d
    finally:
        os.close(fd)  # releases the flock
