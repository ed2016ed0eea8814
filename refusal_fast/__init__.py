"""refusal-fast: fast refusal-direction extraction, interventions and analysis for transformer LMs.

Public API (one screen; see the README):

    means = refusal_fast.extract_means(model, tokenizer, {"harmful": [...], "harmless": [...]})
    result = refusal_fast.select_direction(model, tokenizer, means, harmful_val, harmless_val)
    with refusal_fast.ablate(model, result.direction):
        ...
    refusal_fast.orthogonalize(model, result.direction)

Submodules are imported lazily so ``import refusal_fast`` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # backend
    "backend_info": "refusal_fast.ops",
    # model access and chat formatting
    "get_adapter": "refusal_fast.models",
    "ModelAdapter": "refusal_fast.models",
    "UnsupportedModelError": "refusal_fast.models",
    "format_prompt": "refusal_fast.chat",
    "encode_prompts": "refusal_fast.chat",
    "eoi_positions": "refusal_fast.chat",
    "eoi_tokens": "refusal_fast.chat",
    "refusal_token_ids": "refusal_fast.chat",
    # model identity (artifacts record it; see docs/artifacts.md)
    "weights_fingerprint": "refusal_fast.fingerprint",
    # extraction
    "extract_means": "refusal_fast.extract",
    "Means": "refusal_fast.extract",
    # interventions
    "ablate": "refusal_fast.interventions",
    "steer": "refusal_fast.interventions",
    "add": "refusal_fast.interventions",
    "orthogonalize": "refusal_fast.interventions",
    "orthonormalize": "refusal_fast.interventions",
    "row_interventions": "refusal_fast.interventions",
    "OrthogonalizationRecord": "refusal_fast.interventions",
    # evaluation and selection
    "refusal_scores": "refusal_fast.evaluate",
    "kl_divergence": "refusal_fast.evaluate",
    "last_token_logprobs": "refusal_fast.evaluate",
    "JudgeRefusalClassifier": "refusal_fast.evaluate",
    "generate_completions": "refusal_fast.evaluate",
    "SubstringRefusalClassifier": "refusal_fast.evaluate",
    "PrefixRefusalClassifier": "refusal_fast.evaluate",
    "evaluate_prompts": "refusal_fast.evaluate",
    "select_direction": "refusal_fast.select",
    "SelectionResult": "refusal_fast.select",
    "NoDirectionError": "refusal_fast.select",
    # demo model
    "load_demo_model": "refusal_fast.demo_model",
}

__all__ = sorted(_EXPORTS) + ["__version__", "datasets"]


def __getattr__(name: str):
    if name == "datasets":
        return importlib.import_module("refusal_fast.datasets")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
