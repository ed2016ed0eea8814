"""Shared fixtures: tiny random-initialised models of every supported architecture."""
import os

# Triton kernels run on the CPU through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_flush_denormal(True)
# Tiny models: one thread is faster than two (no sync overhead) and keeps runs predictable.
# Tests on the real demo model raise it locally (see test_demo_model.py).
torch.set_num_threads(int(os.environ.get("REFUSAL_FAST_TEST_THREADS", "1")))

from tiny_models import ARCHS, make_model, make_tokenizer  # noqa: E402

from refusal_fast import datasets  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """Small BPE tokenizer with a ChatML template."""
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_model("llama", tokenizer), tokenizer


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return make_model("gpt2", tokenizer), tokenizer


@pytest.fixture(scope="session")
def gemma2():
    tok = make_tokenizer("gemma")
    return make_model("gemma2", tok), tok


@pytest.fixture(scope="session", params=ARCHS)
def any_arch(request, tokenizer):
    """(model, tokenizer) for each of the seven supported architectures."""
    tok = make_tokenizer("gemma") if request.param == "gemma2" else tokenizer
    return make_model(request.param, tok), tok


@pytest.fixture(scope="session")
def harmful():
    return datasets.instructions("harmful_train", n=12)


@pytest.fixture(scope="session")
def harmless():
    return datasets.instructions("harmless_train", n=12)
