"""Loading helpers for the command line: models, datasets and directions.

Everything here is offline: local model directories are read with ``local_files_only=True``
and remote code is refused unless the caller opts in.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .artifacts import load_tensors, save_tensors

__all__ = [
    "CLIError", "DEMO_MODELS", "DIRECTION_KIND", "parse_dtype", "resolve_device", "load_model", "load_dataset",
    "save_direction", "load_direction",
]

DIRECTION_KIND = "refusal_fast.direction"

DEMO_MODELS = ("demo", "demo-base")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class CLIError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 1, no traceback."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"|"fp32"|"bfloat16"|"bf16"|"float16"|"fp16"`` (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise CLIError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16")
    return _DTYPES[key]


def resolve_device(name: str | None) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` -> torch.device."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"invalid device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return dev


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | None = "cpu",
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` for the CLI.

    Args:
        path: a local directory written by ``save_pretrained`` (model + tokenizer), or the literal
            ``"demo"`` (the refusal-patched SmolLM2-135M-Instruct demo model) / ``"demo-base"``
            (the unpatched SmolLM2-135M-Instruct).
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``).
        device: ``cpu``, ``cuda[:i]`` or ``auto``.
        trust_remote_code: allow custom modelling code shipped with the checkpoint (off by default).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer with a pad token
        and left padding.

    Raises:
        CLIError: the path does not exist, is not a model directory, or loading fails.
    """
    from .chat import ensure_pad_token

    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    spec = str(path)
    if spec in DEMO_MODELS:
        from .demo_model import load_demo_model

        try:
            model, tokenizer = load_demo_model(base=(spec == "demo-base"), dtype=torch_dtype)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise CLIError(f"could not load the demo model: {exc}") from None
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise CLIError(
                f"model path not found: {spec} (give a local directory written by save_pretrained, "
                f"or 'demo' / 'demo-base' for the shipped demo model)"
            )
        if not p.is_dir() or not (p / "config.json").is_file():
            raise CLIError(f"{spec} is not a model directory (no config.json); save the model with save_pretrained")
        tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((p / f).is_file() for f in tok_files):
            raise CLIError(f"{spec} has no tokenizer files ({', '.join(tok_files)}); save the tokenizer into the "
                           f"same directory with tokenizer.save_pretrained")
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(p), local_files_only=True, trust_remote_code=trust_remote_code
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(p), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())[:400] or type(exc).__name__
            needs_code = "auto_map" in (p / "config.json").read_text(encoding="utf-8", errors="replace")
            hint = (" (the model ships custom code: pass --trust-remote-code)"
                    if needs_code and not trust_remote_code else "")
            raise CLIError(f"could not load the model from {spec}: {msg}{hint}") from None
    ensure_pad_token(tokenizer)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CLIError(f"the tokenizer of {spec} has no chat template; refusal-fast needs a chat model")
    model = model.to(dev).eval()
    return model, tokenizer


def load_dataset(spec: str, n: int | None = None, seed: int | None = 0, what: str = "dataset") -> list[dict]:
    """Rows ``{"instruction", "category"}`` of a shipped dataset name or a JSON file path.

    ``spec`` may join several sources with ``+`` (e.g. ``harmful_val+harmbench_test``); ``n`` then
    takes a seeded random subset of the union (all rows when ``n`` is None or larger).
    """
    from . import datasets

    rows: list[dict] = []
    for part in [s for s in str(spec).split("+") if s]:
        if part not in datasets.NAMES and not Path(part).expanduser().is_file():
            raise CLIError(
                f"{what}: {part!r} is neither a shipped dataset ({', '.join(datasets.NAMES)}) nor an existing JSON file"
            )
        try:
            rows += datasets.load(part if part in datasets.NAMES else str(Path(part).expanduser()))
        except json.JSONDecodeError as exc:
            raise CLIError(f"{what}: {part} is not valid JSON ({exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CLIError(f"{what}: {exc}") from None
    if not rows:
        raise CLIError(f"{what}: {spec!r} holds no prompts")
    if n is not None:
        if n < 1:
            raise CLIError(f"{what}: the number of prompts must be >= 1, got {n}")
        if n < len(rows):
            import random

            idx = sorted(random.Random(seed).sample(range(len(rows)), n))
            rows = [rows[i] for i in idx]
    return rows


def save_direction(path: str | os.PathLike, direction: torch.Tensor, metadata: dict | None = None) -> Path:
    """Save a direction ``[d_model]`` (or basis ``[k, d_model]``) float64 as a checksummed safetensors file,
    ``metadata`` (layer, position, the model's identity) in its header; written atomically."""
    t = direction.detach().to("cpu", torch.float64).contiguous()
    return save_tensors(path, {"direction": t}, metadata or {}, kind=DIRECTION_KIND, version=1, sidecar=False)


def load_direction(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """``(direction [d_model] or [k, d_model] float64, metadata)`` from :func:`save_direction`'s file, verified.

    Raises:
        CLIError: no such file. ArtifactError (a ValueError): corrupt, truncated or not a direction file.
    """
    p = Path(path)
    if not p.exists():
        raise CLIError(f"direction file not found: {p} (run `refusal-fast select` first, or pass --direction)")
    tensors, meta = load_tensors(p, kind=DIRECTION_KIND, max_version=1, what="direction")
    return tensors["direction"].to(torch.float64), meta
