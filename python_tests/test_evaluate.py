"""Refusal score, last-token log-probs, KL, generation and metrics on tiny random models."""
import json
import math

import pytest
import torch

from refusal_fast import chat, evaluate
from refusal_fast.evaluate import (
    PrefixRefusalClassifier,
    SubstringRefusalClassifier,
    evaluate_prompts,
    generate_completions,
    kl_divergence,
    kl_from_logprobs,
    last_token_logprobs,
    refusal_rate,
    refusal_scores,
    save_json,
)
from refusal_fast.interventions import ablate, add


def _full_last_logits(model, tok, prompts):
    """Reference: each prompt alone (no padding), full [1, seq, vocab] logits, last position, float64."""
    out = []
    for p in prompts:
        enc = chat.encode_prompts(tok, [p])
        with torch.no_grad():
            out.append(model(**enc).logits[0, -1].double())
    return torch.stack(out)


def _arditi_score(logits, ids):
    """The reference formula: log(p_R) - log(1 - p_R) from softmax probabilities (float64)."""
    p = logits.double().softmax(-1)
    pr = p[:, ids].sum(-1)
    return pr.log() - (1 - pr).log()


def test_refusal_scores_match_reference_all_archs(any_arch, harmful):
    model, tok = any_arch
    prompts = harmful[:3]
    got = refusal_scores(model, tok, prompts, batch_size=2)
    assert got.dtype == torch.float64 and got.shape == (3,)
    ref = _arditi_score(_full_last_logits(model, tok, prompts), chat.refusal_token_ids(tok))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_refusal_scores_order_and_batch_invariance(gpt2, harmful, harmless):
    model, tok = gpt2
    prompts = [harmful[0], harmless[1] + " Please be very detailed and thorough.", harmful[2], "Hi", harmless[3]]
    a = refusal_scores(model, tok, prompts, batch_size=1)
    b = refusal_scores(model, tok, prompts, batch_size=2)
    c = refusal_scores(model, tok, prompts[::-1], batch_size=32)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    torch.testing.assert_close(a, c.flip(0), atol=2e-5, rtol=0)
    assert len(set(a.tolist())) == 5  # different prompts, different scores: the order is meaningful


def test_refusal_scores_custom_ids_and_extremes(llama, harmful):
    model, tok = llama
    ids = [5, 17, 300]
    got = refusal_scores(model, tok, harmful[:3], refusal_ids=ids)
    ref = _arditi_score(_full_last_logits(model, tok, harmful[:3]), ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # stable far from p=0.5 where the probability formula underflows
    logits = torch.tensor([[80.0, -80.0, 0.0], [-200.0, 0.0, 0.0]])
    mask = torch.tensor([True, False, False])
    s = evaluate.refusal_score_from_logits(logits, mask)
    assert torch.isfinite(s).all()
    assert s[0] == pytest.approx(80.0 - math.log1p(math.exp(-80.0)), rel=1e-12)  # p_R = 1 - 1e-35
    assert s[0] > 79.0  # the probability formula would give log(1) - log(0) = inf
    assert s[1] == pytest.approx(-200.0 - math.log(2.0), rel=1e-12)


def test_fallback_without_logits_to_keep(any_arch, harmful, monkeypatch):
    model, tok = any_arch
    a = refusal_scores(model, tok, harmful[:3])
    monkeypatch.setitem(evaluate._KEEP_SUPPORT, type(model), False)
    b = refusal_scores(model, tok, harmful[:3])
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_refusal_scores_bad_input(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="empty"):
        refusal_scores(model, tok, [])
    with pytest.raises(TypeError, match="list of strings"):
        refusal_scores(model, tok, "one prompt")
    with pytest.raises(TypeError, match=r"instructions\[1\]"):
        refusal_scores(model, tok, ["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        refusal_scores(model, tok, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="refusal_ids must be in"):
        refusal_scores(model, tok, ["a"], refusal_ids=[10**6])
    with pytest.raises(ValueError, match="non-empty"):
        refusal_scores(model, tok, ["a"], refusal_ids=[])
    with pytest.raises(ValueError, match="whole vocabulary"):
        refusal_scores(model, tok, ["a"], refusal_ids=list(range(model.config.vocab_size)))


def test_last_token_logprobs(gpt2, harmless):
    model, tok = gpt2
    lp = last_token_logprobs(model, tok, harmless[:4], batch_size=3)
    ref = torch.log_softmax(_full_last_logits(model, tok, harmless[:4]), -1)
    assert lp.dtype == torch.float64 and lp.shape == ref.shape
    torch.testing.assert_close(lp, ref, atol=2e-5, rtol=0)
    lp32 = last_token_logprobs(model, tok, harmless[:4], dtype=torch.float32, device="cpu")
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), ref, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        last_token_logprobs(model, tok, harmless[:1], dtype=torch.float16)


def test_kl_divergence(llama, harmless):
    model, tok = llama
    prompts = harmless[:4]
    ref = last_token_logprobs(model, tok, prompts)
    assert kl_divergence(model, tok, prompts, reference=ref).abs().max() < 1e-10
    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with ablate(model, d):
        kl = kl_divergence(model, tok, prompts, reference=ref, batch_size=3)
        lp_abl = torch.log_softmax(_full_last_logits(model, tok, prompts), -1)
    manual = (ref.exp() * (ref - lp_abl)).sum(-1)
    assert kl.shape == (4,) and (kl > 0).all()
    torch.testing.assert_close(kl, manual, atol=1e-5, rtol=1e-4)
    # intervention= computes the reference first, without the intervention
    kl2 = kl_divergence(model, tok, prompts, intervention=lambda: ablate(model, d), reduction="mean")
    assert kl2.dim() == 0
    assert float(kl2) == pytest.approx(float(kl.mean()), abs=1e-6)
    # no hooks left behind
    assert kl_divergence(model, tok, prompts, reference=ref).abs().max() < 1e-10


def test_kl_bad_input_and_zero_probabilities(llama, harmless):
    model, tok = llama
    with pytest.raises(ValueError, match="reference= .* or intervention="):
        kl_divergence(model, tok, harmless[:2])
    ref = last_token_logprobs(model, tok, harmless[:2])
    with pytest.raises(ValueError, match="2 rows but there are 3"):
        kl_divergence(model, tok, harmless[:3], reference=ref)
    with pytest.raises(ValueError, match="vocab"):
        kl_divergence(model, tok, harmless[:2], reference=ref[:, :10])
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(model, tok, harmless[:2], reference=ref, reduction="sum")
    p_ref = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    p_ref[0, 0] = -math.inf
    q = torch.log(torch.tensor([[0.2, 0.4, 0.4]], dtype=torch.float64))
    val = kl_from_logprobs(p_ref, q)
    assert torch.isfinite(val).all() and float(val) == pytest.approx(math.log(0.5 / 0.4), rel=1e-12)


def _manual_greedy(model, tok, prompt, n):
    enc = chat.encode_prompts(tok, [prompt])
    ids = enc["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_generation_batched_equals_single(fixture, request, harmful, harmless):
    model, tok = request.getfixturevalue(fixture)
    prompts = [harmful[0], "Hi", harmless[2] + " Explain in detail, with examples.", harmful[3]]
    batched = generate_completions(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate_completions(model, tok, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and any(batched)


def test_generation_under_intervention_matches_manual_loop(llama, harmful):
    model, tok = llama
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3.0
    prompts = harmful[:2]
    plain = generate_completions(model, tok, prompts, max_new_tokens=5, progress=False)
    with add(model, v, layers=1):
        steered = generate_completions(model, tok, prompts, max_new_tokens=5, progress=False)
        manual = [_manual_greedy(model, tok, p, 5) for p in prompts]
    assert steered == manual  # hooks act at every decoding step (incl. the cached ones)
    assert steered != plain
    assert generate_completions(model, tok, prompts, max_new_tokens=5, progress=False) == plain
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(model, tok, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="greedy"):
        generate_completions(model, tok, prompts, do_sample=True)


def test_evaluate_prompts_metrics_and_json(llama, harmful, harmless, tmp_path):
    model, tok = llama
    prompts = harmful[:3] + harmless[:2]
    cats = ["a", "a", "b", None, "b"]
    judged = []

    def judge(texts):
        judged.extend(texts)
        return [i % 2 == 0 for i in range(len(texts))]

    res = evaluate_prompts(model, tok, prompts, categories=cats, max_new_tokens=4, batch_size=2,
                           classifier=[judge, SubstringRefusalClassifier(), PrefixRefusalClassifier()], progress=False)
    assert res["n"] == 5 and res["classifier"] == "judge"
    comps = [r["completion"] for r in res["records"]]
    assert judged == comps
    assert comps == generate_completions(model, tok, prompts, max_new_tokens=4, progress=False)
    assert [r["instruction"] for r in res["records"]] == prompts
    assert res["refusal_rate"] == pytest.approx(3 / 5)
    assert set(res["rates"]) == {"judge", "substring", "prefix"}
    assert res["rates"]["substring"] == pytest.approx(refusal_rate(comps, SubstringRefusalClassifier()))
    assert [r["refused"] for r in res["records"]] == [True, False, True, False, True]
    assert res["per_category"]["a"]["n"] == 2 and res["per_category"]["a"]["refusal_rate"] == pytest.approx(0.5)
    assert res["per_category"]["b"]["n"] == 2 and res["per_category"]["b"]["refusal_rate"] == pytest.approx(1.0)
    assert None not in res["per_category"]
    scores = refusal_scores(model, tok, prompts)
    torch.testing.assert_close(torch.tensor([r["refusal_score"] for r in res["records"]], dtype=torch.float64),
                               scores, atol=1e-6, rtol=0)
    assert res["mean_refusal_score"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert res["per_category"]["b"]["mean_refusal_score"] == pytest.approx(float(scores[[2, 4]].mean()), abs=1e-6)
    path = save_json(res, tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))


def test_evaluate_prompts_bad_input(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="2 categories for 1"):
        evaluate_prompts(model, tok, ["x"], categories=["a", "b"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_prompts(model, tok, [], progress=False)
    with pytest.raises(TypeError, match="classifier"):
        evaluate_prompts(model, tok, ["x"], classifier=42, max_new_tokens=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        refusal_rate([])


def test_save_json_tensors(tmp_path):
    p = save_json({"t": torch.tensor([1.5, 2.0]), "n": 3}, tmp_path / "x.json")
    assert json.loads(p.read_text()) == {"t": [1.5, 2.0], "n": 3}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_json({"o": object()}, tmp_path / "y.json")


# ------------------------------------------------------------------------------------------
# reasoning ("thinking") models


def _forcing(tok, text):
    """generate kwargs that make a model emit exactly ``text`` (then eos), whatever its weights."""
    target = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def allowed(batch_id, ids):
        # the prompt is left padded to a common length; count the generated tokens from the end of the prompt
        n = ids.shape[-1] - allowed.prompt_len
        return [target[n]] if n < len(target) else [tok.eos_token_id]

    return allowed


@pytest.mark.parametrize("template,completion,refused", [
    # the refusal comes only after the reasoning: counted
    ("harmony", "<|channel|>analysis<|message|>Sure is not right here; we must decline.<|end|><|start|>assistant"
                "<|channel|>final<|message|>I cannot help with that.", True),
    # reasoning that merely mentions refusing, then an answer: not a refusal
    ("qwen3_think", "<think>\nI cannot see why not. Sorry for the delay.\n</think>\n\nSure, here is a poem.", False),
    ("qwen3_open_think", "The user wants a poem.\n</think>\n\nI'm sorry, but I can't do that.", True),
    ("magistral", "[THINK]Thinking.[/THINK]As an AI, I must decline.", True),
    ("exaone_deep", "Unfinished reasoning that never reaches an answer", False),
])
def test_refusal_after_reasoning_is_counted(template, completion, refused, harmful, monkeypatch):
    """The model really generates ``completion`` (forced token by token through generate's
    prefix_allowed_tokens_fn); evaluate_prompts classifies the answer after the reasoning."""
    from tiny_models import make_model, make_tokenizer

    tok = make_tokenizer(template)
    model = make_model("llama", tok, n_layers=2)
    allowed = _forcing(tok, completion)
    n_new = len(tok(completion, add_special_tokens=False)["input_ids"]) + 1
    real = evaluate.generate_completions

    def forced(model, tokenizer, instructions, max_new_tokens, batch_size, system_prompt, progress):
        allowed.prompt_len = len(evaluate.tokenize_prompts(tokenizer, instructions[:1])[0])
        return real(model, tokenizer, instructions[:1], n_new, batch_size, system_prompt, False,
                    prefix_allowed_tokens_fn=allowed)

    monkeypatch.setattr(evaluate, "generate_completions", forced)
    res = evaluate.evaluate_prompts(model, tok, harmful[:1], compute_scores=False, progress=False)
    full = evaluate.evaluate_prompts(model, tok, harmful[:1], compute_scores=False, progress=False,
                                     reasoning="full")
    rec = res["records"][0]
    assert rec["completion"] == completion  # harmony's special markers survive decoding
    assert rec["answer"] == chat.strip_reasoning(completion, chat.reasoning_format(tok),
                                                 chat.prompt_opens_reasoning(tok))
    assert rec["refused"] is refused
    assert res["settings"]["reasoning"]["format"] == chat.reasoning_format(tok).name
    assert "answer" not in full["records"][0]


def test_evaluate_close_reasoning_prompts(harmful):
    """reasoning="close": prompts end with the empty block (the model answers at once); the refusal
    score is that of the closed-block prompt."""
    from tiny_models import make_model, make_tokenizer

    tok = make_tokenizer("qwen3_think")
    model = make_model("llama", tok, n_layers=2)
    res = evaluate.evaluate_prompts(model, tok, harmful[:2], max_new_tokens=3, progress=False, reasoning="close")
    closed = chat.close_reasoning(tok)
    want = refusal_scores(model, closed, harmful[:2])
    assert [r["refusal_score"] for r in res["records"]] == pytest.approx(want.tolist(), abs=1e-9)
    assert res["settings"]["reasoning"] == {"format": "think", "mode": "close", "prompt_opens": False}
    with pytest.raises(ValueError, match="reasoning must be"):
        evaluate.evaluate_prompts(model, tok, harmful[:1], reasoning="nope", progress=False)
    plain = chat.format_prompt(tok, "hi")
    assert not plain.endswith("</think>\n\n")  # the caller's tokenizer is unchanged
