"""refusal_fast.fingerprint: the weights fingerprint and the model-identity check.

(The real demo model vs ``demo-base``: test_demo_model.py::test_weights_fingerprint_tells_demo_from_demo_base.)
"""
import copy

import pytest
import torch
import transformers
from tiny_models import make_model, make_tokenizer

from refusal_fast.fingerprint import (
    FINGERPRINT_METHOD,
    ModelMismatchError,
    check_identity,
    model_identity,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def model(tok):
    return make_model("llama", tok)


def test_same_config_other_weights_differ(tok, model):
    other = make_model("llama", tok, seed=1)
    assert model_identity(model)["config_hash"] == model_identity(other)["config_hash"]
    assert weights_fingerprint(model) != weights_fingerprint(other)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # one whole tensor changed
    assert weights_fingerprint(edited) != weights_fingerprint(model)


def test_stable_across_copies_save_load_and_rng(tok, model, tmp_path):
    fp = weights_fingerprint(model)
    assert len(fp) == 32 and int(fp, 16) >= 0
    torch.manual_seed(123)  # the sampled positions do not depend on torch's RNG
    assert weights_fingerprint(copy.deepcopy(model)) == fp
    model.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert weights_fingerprint(loaded) == fp


def test_dtype_behaviour_is_as_documented(tok, model, tmp_path):
    """Values are hashed after rounding to bfloat16: float32 and bfloat16 copies agree (and a float32 model
    upcast from bfloat16 weights); a float16 copy does not; the dtype is recorded separately."""
    fp = weights_fingerprint(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_fingerprint(bf16) == fp
    model.save_pretrained(tmp_path / "m32")
    loaded_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m32", dtype=torch.bfloat16)
    assert weights_fingerprint(loaded_bf16) == fp
    up = copy.deepcopy(bf16).to(torch.float32)
    assert weights_fingerprint(up) == weights_fingerprint(bf16)
    fp16 = copy.deepcopy(model).to(torch.float16)
    assert weights_fingerprint(fp16) != fp
    assert model_identity(bf16)["dtype"] == "bfloat16" and model_identity(model)["dtype"] == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_identical_across_devices(model):
    assert weights_fingerprint(copy.deepcopy(model).cuda()) == weights_fingerprint(model)


def test_meta_device_is_a_clear_error(tok):
    with torch.device("meta"):
        m = make_model("llama", tok)
    with pytest.raises(ValueError, match="meta device"):
        weights_fingerprint(m)


def test_check_identity(tok, model):
    rec = model_identity(model)
    assert rec["fingerprint_method"] == FINGERPRINT_METHOD
    assert check_identity(rec, model) is None
    other = make_model("llama", tok, seed=1)
    other.config._name_or_path = "the-other"
    with pytest.raises(ModelMismatchError, match="weights_fingerprint.*same configuration, different weights"):
        check_identity(rec, other, what="X came from")
    transfer = check_identity(rec, other, allow_other_weights=True)
    assert transfer["differs"] == ["weights_fingerprint"] and transfer["target_model"]["name_or_path"] == "the-other"
    deeper = make_model("llama", tok, n_layers=4)
    with pytest.raises(ModelMismatchError, match="n_layers.*cannot be used"):  # never relaxed
        check_identity(rec, deeper, allow_other_weights=True)
    gpt2 = make_model("gpt2", tok)
    with pytest.raises(ModelMismatchError, match="arch"):
        check_identity(rec, gpt2, allow_other_weights=True)
    assert check_identity({"n_layers": 3}, other) is None  # only what is recorded is checked
    with pytest.raises(ModelMismatchError, match="delete it"):
        check_identity(rec, other, hint="delete it")


def test_fingerprint_benchmark_runs():
    from bench.bench_fingerprint import rows

    r = rows(smoke=True, rounds=1)
    assert [x["model"] for x in r] == ["random Llama (bf16)", "Llama shapes (smoke)"]
    assert all(x["fingerprint_s"] > 0 for x in r) and r[0]["full_sha256_s"] > 0
