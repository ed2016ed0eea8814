"""Per-category refusal directions: extraction, cosine, PCA, cross / subspace ablation, nulls, plots."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from refusal_fast import chat, datasets
from refusal_fast.analysis import (
    GLOBAL,
    CategoryDirections,
    EvalConfig,
    category_directions,
    category_pca,
    cosine_similarity,
    cross_ablation,
    default_layer,
    derive_seed,
    random_basis,
    random_like,
    split_prompts,
    subspace_ablation,
)
from refusal_fast.evaluate import refusal_scores
from refusal_fast.interventions import ablate


@pytest.fixture(scope="module")
def cats():
    allc = datasets.categories("harmbench_test")
    names = sorted(allc)[:3]
    train = {c: allc[c][:4] for c in names}
    held = {c: allc[c][4:6] for c in names}
    return train, held


@pytest.fixture(scope="module")
def cd(llama, cats, harmless):
    model, tok = llama
    return category_directions(model, tok, cats[0], harmless[:8])


def _last_token_hidden(model, tok, prompts, system_prompt=None):
    """[n_prompts, n_layers, d] hidden_states[l] at the last token, one unpadded prompt at a time."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(chat.format_prompt(tok, p, system_prompt), add_special_tokens=False, return_tensors="pt")
            hs = model(**ids, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, -1].double() for h in hs[: model.config.num_hidden_layers]]))
    return torch.stack(out)


def test_split_prompts_disjoint_and_reproducible():
    c = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(4)]}
    tr, he = split_prompts(c, holdout=0.3, seed=1)
    tr2, he2 = split_prompts(c, holdout=0.3, seed=1)
    assert tr == tr2 and he == he2
    for k in c:
        assert sorted(tr[k] + he[k]) == sorted(c[k]) and not set(tr[k]) & set(he[k])
    assert len(he["a"]) == 3 and len(he["b"]) == 1
    assert split_prompts(c, holdout=0.3, seed=2)[1] != he
    with pytest.raises(ValueError, match="too few"):
        split_prompts({"x": ["only"]})


def test_directions_match_direct_hidden_states(llama, cats, harmless, cd):
    model, tok = llama
    train = cats[0]
    hl = _last_token_hidden(model, tok, harmless[:8]).mean(0)               # [L, d]
    per = {c: _last_token_hidden(model, tok, train[c]) for c in train}
    for i, c in enumerate(cd.categories):
        torch.testing.assert_close(cd.directions[1:, i], (per[c].mean(0) - hl)[1:], atol=2e-4, rtol=1e-4)
    glob = torch.cat(list(per.values())).mean(0) - hl
    torch.testing.assert_close(cd.global_direction[1:], glob[1:], atol=2e-4, rtol=1e-4)
    # layer 0 at the last token: the same template token for every prompt -> exactly zero
    assert cd.norms()[0].eq(0).all() and cd.global_direction[0].eq(0).all()
    n = model.config.num_hidden_layers
    assert cd.layer_mode == "default" and set(cd.chosen_layer.values()) == {default_layer(n)}
    assert cd.counts == {**{c: 4 for c in train}, "harmless": 8}
    torch.testing.assert_close(cd.chosen()[0], cd.directions[default_layer(n), 0])


def test_cosine_matrix_is_normalised_dot_products(cd):
    cos = cosine_similarity(cd)
    assert cos.labels == cd.categories + [GLOBAL]
    X = np.concatenate([cd.directions.numpy(), cd.global_direction.numpy()[:, None]], axis=1)  # [L, n+1, d]
    for li in range(1, len(cd.layers)):
        u = X[li] / np.linalg.norm(X[li], axis=1, keepdims=True)
        np.testing.assert_allclose(cos.by_layer[li], u @ u.T, atol=1e-12)
        n = len(cd.categories)
        off = (u[:n] @ u[:n].T)[~np.eye(n, dtype=bool)].mean()
        assert cos.mean_offdiag_by_layer[li] == pytest.approx(off)
    assert np.isnan(cos.by_layer[0]).all()  # zero directions: undefined, not a fake number
    ch = np.concatenate([cd.chosen().numpy(), cd.direction(GLOBAL).numpy()[None]])
    ch = ch / np.linalg.norm(ch, axis=1, keepdims=True)
    np.testing.assert_allclose(cos.matrix, ch @ ch.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(cos.matrix), 1.0, atol=1e-12)
    d = json.loads(cos.to_json())  # strict JSON: NaN -> null
    assert d["by_layer"][0][0][0] is None and d["matrix"][0][0] == pytest.approx(1.0)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_pca_matches_sklearn(cd, center, normalize):
    res = category_pca(cd, center=center, normalize=normalize)
    X = cd.chosen().numpy()
    if normalize:
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    if center:
        ref = PCA(n_components=X.shape[0]).fit(X)
        np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio_, atol=1e-10)
        np.testing.assert_allclose(np.abs(res.components @ ref.components_.T)[:2, :2], np.eye(2), atol=1e-8)
    else:  # uncentred = SVD of X
        s = np.linalg.svd(X, compute_uv=False)
        np.testing.assert_allclose(res.explained_variance_ratio, s**2 / (s**2).sum(), atol=1e-10)
        np.testing.assert_allclose(res.singular_values, s, rtol=1e-8)
    cum = np.cumsum(res.explained_variance_ratio)
    assert res.n_components_90 == int(np.argmax(cum >= 0.9 - 1e-12)) + 1
    # angle to the top-k subspace, computed directly
    C = np.asarray(res.components)
    u = X / np.linalg.norm(X, axis=1, keepdims=True)
    for k in range(1, C.shape[0] + 1):
        cosk = np.linalg.norm(u @ C[:k].T, axis=1)
        np.testing.assert_allclose(res.angles_deg[:, k - 1], np.degrees(np.arccos(np.clip(cosk, 0, 1))), atol=1e-6)
    if not center:  # all components span every direction
        np.testing.assert_allclose(res.angles_deg[:, -1], 0.0, atol=1e-4)


def test_pca_at_zero_layer_is_an_error(cd):
    with pytest.raises(ValueError, match="zero"):
        category_pca(cd, layer=0)
    assert category_pca(cd, layer=1).layer == 1


def test_random_null_same_norm_and_seeded():
    v = torch.randn(3, 37, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.1]])
    a, b, c = random_like(v, 7), random_like(v, 7), random_like(v, 8)
    torch.testing.assert_close(torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(v, dim=-1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(torch.nn.functional.cosine_similarity(a, v).abs().max())) < 0.9
    q = random_basis(4, 37, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64))
    assert torch.equal(q, random_basis(4, 37, seed=3))
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


def _direct(model, tok, basis, prompts):
    with ablate(model, basis):
        return float(refusal_scores(model, tok, prompts).mean())


def test_cross_ablation_uses_the_right_directions(llama, cd, cats):
    model, tok = llama
    held = cats[1]
    res = cross_ablation(model, tok, cd, held, n_random=1, seed=5)
    n = len(cd.categories)
    assert res.ablated == cd.categories + [GLOBAL] and res.evaluated == list(held)
    assert res.refusal_score.shape == (n + 1, n) and res.random_score.shape == (n + 1, n)
    for j, c in enumerate(held):
        assert res.baseline_score[j] == pytest.approx(float(refusal_scores(model, tok, held[c]).mean()), abs=1e-5)
    for i, c in enumerate(cd.categories):  # diagonal: category i's own direction on its own prompts
        assert res.refusal_score[i, i] == pytest.approx(_direct(model, tok, cd.direction(c), held[c]), abs=1e-5)
    j = 1
    assert res.refusal_score[n, j] == pytest.approx(_direct(model, tok, cd.direction(GLOBAL), held[res.evaluated[j]]),
                                                    abs=1e-5)
    # random null: same norm, reproducible from the seed
    np.testing.assert_allclose(res.random_norms[:, 0], res.direction_norms, rtol=1e-12)
    rv = random_like(cd.direction(cd.categories[0]), derive_seed(5, 1, 0, 0))
    assert res.random_score[0, 0] == pytest.approx(_direct(model, tok, rv, held[res.evaluated[0]]), abs=1e-5)
    assert res.refusal_rate is None and res.random_score_std.shape == (n + 1, n)
    d = json.loads(res.to_json())
    assert d["kind"] == "CrossAblationResult" and len(d["refusal_score"]) == n + 1


def test_subspace_ablation_pcs_and_all(llama, cd, cats):
    model, tok = llama
    held = cats[1]
    n = len(cd.categories)
    pca = category_pca(cd)
    res = subspace_ablation(model, tok, cd, held, ks=(1, 2, 3, 4, 5), pca=pca, n_random=1)
    assert res.conditions == ["PC1", "PC1-2", "PC1-3", "all categories"] and res.ranks == [1, 2, 3, 3]
    c0 = res.evaluated[0]
    assert res.refusal_score[0, 0] == pytest.approx(_direct(model, tok, pca.components[:1], held[c0]), abs=1e-5)
    # the top-n PCs span exactly the category directions: same projection, same scores
    np.testing.assert_allclose(res.refusal_score[n - 1], res.refusal_score[n], atol=1e-4)
    assert not np.allclose(res.random_score, res.refusal_score)
    with pytest.raises(ValueError, match="no condition"):
        subspace_ablation(model, tok, cd, held, ks=(9,), include_all=False, pca=pca)


def test_subspace_ablation_with_generation(llama, cd, cats):
    model, tok = llama
    held = {c: v[:1] for c, v in cats[1].items()}
    res = subspace_ablation(model, tok, cd, held, ks=(1,), include_all=False, n_random=1,
                            cfg=EvalConfig(generate=True, max_new_tokens=2))
    for key in ("baseline_rate", "refusal_rate", "random_rate"):
        a = np.asarray(getattr(res, key))
        assert a.shape[-1] == len(held) and ((a >= 0) & (a <= 1)).all()
    assert res.eval_config["generate"] is True


def test_select_mode(llama, cats, harmless):
    model, tok = llama
    train, held = cats
    cd = category_directions(model, tok, train, harmless[:6], layer="select", val_prompts=held,
                             harmless_val=harmless[6:9])
    assert cd.layer_mode == "select"
    for c in cd.categories + [GLOBAL]:
        s = cd.selection[c]
        assert s["layer"] in (1, 2) and set(s) >= {"found", "bypass", "induce", "kl"}
    assert cd.global_layer == cd.selection[GLOBAL]["layer"]
    assert {c: cd.selection[c]["layer"] for c in cd.categories} == cd.chosen_layer
    with pytest.raises(ValueError, match="val_prompts"):
        category_directions(model, tok, train, harmless[:6], layer="select")


def test_given_layer_and_bad_arguments(llama, cats, harmless):
    model, tok = llama
    cd = category_directions(model, tok, cats[0], harmless[:4], layer=-2)
    assert cd.layer_mode == "given" and set(cd.chosen_layer.values()) == {1} and cd.global_layer == 1
    with pytest.raises(ValueError, match="zero at their chosen layer"):
        category_directions(model, tok, cats[0], harmless[:4], layer=0)
    with pytest.raises(ValueError, match="layer must be"):
        category_directions(model, tok, cats[0], harmless[:4], layer="best")
    with pytest.raises(ValueError, match="position"):
        category_directions(model, tok, cats[0], harmless[:4], position=0)
    with pytest.raises(ValueError, match="no prompts"):
        category_directions(model, tok, {"a": []}, harmless[:4])
    with pytest.raises(TypeError):
        category_directions(model, tok, cats[0], {"h": harmless[:4]})


def test_save_load_and_json(cd, tmp_path):
    p = cd.save(tmp_path / "cats.safetensors")
    back = CategoryDirections.load(p)
    assert torch.equal(back.directions, cd.directions) and back.chosen_layer == cd.chosen_layer
    assert back.categories == cd.categories and back.global_layer == cd.global_layer
    d = json.loads((tmp_path / "cats.json").read_text())
    assert d["norms"][0] == [0.0] * len(cd.categories) and "directions" not in d
    pca = category_pca(cd)
    d = json.loads(pca.to_json(tmp_path / "pca.json"))
    assert d["n_components_90"] == pca.n_components_90 and "components" not in d
    assert all(not (isinstance(x, float) and math.isnan(x)) for x in d["explained_variance_ratio"])


def test_plots(llama, cd, cats, tmp_path):
    from refusal_fast.analysis import plots

    model, tok = llama
    held = {c: v[:1] for c, v in cats[1].items()}
    cos, pca = cosine_similarity(cd), category_pca(cd)
    xab = cross_ablation(model, tok, cd, held, include_global=False)
    sub = subspace_ablation(model, tok, cd, held, ks=(1,), pca=pca)
    figs = {
        "cos.png": lambda p: plots.plot_cosine(cos, path=p, close=True),
        "cos1.png": lambda p: plots.plot_cosine(json.loads(cos.to_json()), layer=1, path=p, close=True),
        "cosl.png": lambda p: plots.plot_cosine_by_layer(cos, path=p, close=True),
        "pca.png": lambda p: plots.plot_pca(json.loads(pca.to_json()), path=p, close=True),
        "xab.png": lambda p: plots.plot_cross_ablation(json.loads(xab.to_json()), path=p, close=True),
        "sub.png": lambda p: plots.plot_subspace_ablation(sub, path=p, close=True),
    }
    for name, fn in figs.items():
        fn(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
    with pytest.raises(ValueError, match="refusal_rate"):
        plots.plot_cross_ablation(xab, metric="rate")
