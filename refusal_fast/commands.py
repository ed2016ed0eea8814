"""Implementations of the ``refusal-fast`` subcommands (argument parsing lives in :mod:`refusal_fast.cli`).

Each ``cmd_<name>(args, session)`` reads its inputs (model, datasets, earlier artifacts in
``args.out``), calls the library's public functions and writes its artifacts through
:mod:`refusal_fast.artifacts`; it returns a dict (``"model"`` when one was loaded, for the run
metadata). User errors raise :class:`~refusal_fast.io.CLIError`.

Imports go one way: :mod:`refusal_fast.cli` imports this module, never the reverse. The demo runs
its steps through :meth:`Session.run_argv`, with the parser the CLI hands to :class:`Session`.
:func:`open_outputs` checks the output paths and takes the ``--out`` lock before any model loads.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, check_writable, locked_directory, read_json, write_json
from .fingerprint import check_identity, model_identity
from .io import CLIError, load_dataset, load_direction, load_model, save_direction

PROG = "refusal-fast"

DEFAULTS = {
    "out": "refusal_out",
    "harmful_train": "harmful_train",
    "harmless_train": "harmless_train",
    "harmful_val": "harmful_val",
    "harmless_val": "harmless_val",
    "harmful_eval": "harmful_val+harmbench_test",
    "harmless_eval": "harmless_val",
    "categories": "harmbench_test+harmbench_val",
    "persona_instructions": "harmful_val",
    "persona_harmful": "harmbench_val",
}

CONDITIONS = ("baseline", "ablate", "ablate_affine", "random_ablate", "actadd", "random_actadd")
# Which prompt sets each evaluation condition runs on.
_CONDITION_SPLITS = {
    "baseline": ("harmful", "harmless"),
    "ablate": ("harmful", "harmless"),
    "ablate_affine": ("harmful", "harmless"),
    "random_ablate": ("harmful",),
    "actadd": ("harmless",),
    "random_actadd": ("harmless",),
}

#: Demo sizes: (default run, --quick run). The default demo takes about 9 minutes on 2 idle CPU cores
#: with the 135M-parameter demo model (measured; ~80% of it the 126-candidate selection); --quick is for smoke tests.
DEMO_SIZES = {
    "n_train": (128, 16),
    "n_val": (12, 6),
    "n_harmful": (48, 8),
    "n_harmless": (32, 6),
    "max_new_tokens": (32, 12),
    "n_category": (10, 4),
    "n_category_harmless": (32, 12),
}


def demo_select_layers(n_layers: int) -> list[int]:
    """The demo's candidate layers: every layer from 10% to 80% depth (the selection prunes the last 20%).

    Every layer, not every second one: on the demo model the candidates' harmless KL changes sharply from one
    layer to the next (measured with refusal patch 4: 0.21 at layer 20, last position; 1.1-5.4 at the layers
    around it), so skipping layers can miss the one usable direction.
    """
    lo, hi = max(1, n_layers // 10), max(2, int(0.8 * n_layers))
    return list(range(lo, hi)) if hi - lo > 6 else list(range(n_layers))


# ============================================================================== run plumbing


def version() -> str:
    """The package version (``"unknown"`` if it cannot be read)."""
    try:
        from . import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


class Session:
    """Shared state of one CLI invocation: a model cache (the demo loads once) and the argument parser.

    Args:
        parse: ``argv -> argparse.Namespace`` (the CLI's ``parse_args``); :meth:`run_argv` uses it
            so that each demo step is parsed exactly like the corresponding subcommand.
    """

    def __init__(self, parse: Callable[[list[str]], argparse.Namespace] | None = None) -> None:
        self.models: dict[tuple, tuple] = {}
        self.parse = parse

    def model(self, args) -> tuple:
        key = (args.model, args.dtype, args.device, bool(args.trust_remote_code))
        if key not in self.models:
            _say(args, f"loading model {args.model} ({args.dtype})")
            self.models[key] = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
        return self.models[key]

    def run_argv(self, argv: Sequence[str], quiet: bool = False) -> dict:
        """Parse ``argv`` and :func:`run_command` it in this session (the outputs are already locked)."""
        if self.parse is None:
            raise RuntimeError("this Session has no parser; construct it with Session(parse=parser.parse_args)")
        return run_command(self.parse(list(argv)), argv, self, quiet=quiet)


def run_command(args: argparse.Namespace, argv: Sequence[str], session: Session, quiet: bool = False) -> dict:
    """Run the parsed subcommand ``args.func`` and record it in ``<out>/run.json``. Errors propagate."""
    _seed(getattr(args, "seed", 0))
    t0, c0 = time.perf_counter(), time.process_time()
    if quiet:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            res = args.func(args, session)
    else:
        res = args.func(args, session)
    if args.command != "report":
        _record(args, argv, time.perf_counter() - t0, res.get("model"), cpu_seconds=time.process_time() - c0)
    return res


@contextlib.contextmanager
def open_outputs(args: argparse.Namespace) -> Iterator[None]:
    """Before any model is loaded: prove every output directory writable, hold the ``--out`` lock
    (a second run on the same directory fails at once) and check that ``run.json`` is readable."""
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        try:
            if args.command == "report":
                if not out.is_dir():
                    raise CLIError(f"output directory not found: {out} (run some commands with --out {out} first)")
                if args.output is not None:
                    check_writable(Path(args.output).expanduser().resolve().parent, "--output directory")
            elif args.command == "export" and args.export_dir is not None:
                check_writable(args.export_dir, "--export-dir")
            stack.enter_context(locked_directory(out, owner=f"{PROG} {args.command}"))
            _read_run_json(out / "run.json")
        except ArtifactError as exc:
            raise CLIError(str(exc)) from None
        yield


def _read_run_json(path: Path) -> dict:
    """The run history in ``path`` ({} if absent). A corrupt file is an error, never replaced."""
    if not path.exists():
        return {}
    try:
        run = read_json(path, "run history")
    except ArtifactError as exc:
        run, why = None, str(exc)
    else:
        why = f"{path} holds {type(run).__name__}, not a JSON object"
    if not isinstance(run, dict):
        raise CLIError(f"{why}. It is this directory's run history and was left untouched: repair it, restore it "
                       f"from a backup, or move it away (mv {path} {path}.bad) to start a new history")
    return run


def _say(args, msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _out(args) -> Path:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output directory {out}: {exc}") from None
    return out


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _record(args, argv: Sequence[str], seconds: float, model=None, cpu_seconds: float | None = None) -> None:
    """Merge this command's metadata into OUT/run.json (atomically; a corrupt run.json is an error)."""
    out = Path(args.out)
    path = out / "run.json"
    run = _read_run_json(path)
    now = _dt.datetime.now().isoformat(timespec="seconds")
    run.setdefault("created", now)
    run["updated"] = now
    run["library_version"] = version()
    try:
        from .ops import backend_info

        run["backend_info"] = backend_info()
    except Exception as exc:  # noqa: BLE001 - metadata only
        run["backend_info"] = {"error": str(exc)}
    import torch
    import transformers

    run.update(torch_version=torch.__version__, transformers_version=transformers.__version__,
               python=platform.python_version(), platform=platform.platform())
    if model is not None:
        from .models import get_adapter

        ad = get_adapter(model)
        fp = model_identity(model)["weights_fingerprint"]
        if run.get("model") not in (None, args.model) or run.get("weights_fingerprint") not in (None, fp):
            run["commands"] = []  # a different model: earlier command records no longer describe these artifacts
        run.update(model=args.model, model_name_or_path=ad.name_or_path, model_arch=ad.arch, n_layers=ad.n_layers,
                   d_model=ad.d_model, config_hash=ad.config_hash, weights_fingerprint=fp, dtype=args.dtype,
                   device=str(ad.device), seed=args.seed)
        meta = getattr(model, "refusal_patch_metadata", None)
        if isinstance(meta, dict):
            run["refusal_patch"] = {k: meta[k] for k in ("layer", "base_sha256") if k in meta}
    cmds = [c for c in run.get("commands", []) if c.get("command") != args.command]
    cmds.append({"command": args.command, "argv": list(argv), "finished": now, "seconds": round(seconds, 2),
                 "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2),
                 "allow_other_weights": bool(getattr(args, "allow_other_weights", False))})
    run["commands"] = cmds
    write_json(path, run)


def _texts(rows: list[dict]) -> list[str]:
    return [r["instruction"] for r in rows]


def _default_path(value: str | None, args, name: str) -> Path:
    return Path(value) if value else Path(args.out) / name


def _load_any_direction(path: Path) -> dict:
    """``{"direction": unit [d], "raw": [d], "layer", "position", "source", "model_identity"}`` from a
    selection.json or a direction .safetensors (both verified against their checksums)."""
    if path.suffix == ".json":
        from .select import SelectionResult

        sel = SelectionResult.from_json(path)  # checksums verified
        if sel.direction is None or sel.raw is None:
            raise CLIError(f"{path}: the selection found no direction (all candidates were filtered); "
                           f"rerun `{PROG} select` with relaxed thresholds")
        return {"direction": sel.direction, "raw": sel.raw, "layer": sel.layer, "position": sel.position,
                "source": str(path), "model_identity": sel.params.get("model_identity")}
    t, meta = load_direction(path)
    if t.dim() != 1:
        raise CLIError(f"{path}: expected one direction [d_model], got shape {tuple(t.shape)}")
    return {"direction": t / t.norm().clamp_min(1e-300), "raw": t, "layer": meta.get("layer"),
            "position": meta.get("position"), "source": str(path), "model_identity": meta.get("model_identity")}


def _check_direction_model(args, d: dict, model) -> dict | None:
    """The direction ``d`` must come from ``model`` (weights fingerprint) unless --allow-other-weights."""
    allow = bool(getattr(args, "allow_other_weights", False))
    if d.get("model_identity") is None:
        if allow:
            return {"allow_other_weights": True, "source_model": None}
        raise CLIError(f"{d['source']} does not record the model it was selected on (written by an older "
                       f"refusal-fast?); rerun `{PROG} select`, or pass --allow-other-weights to use it anyway")
    try:
        return check_identity(d["model_identity"], model, what=f"the direction in {d['source']} was selected on",
                              allow_other_weights=allow)
    except ValueError as exc:
        raise CLIError(f"{exc} (--model {args.model})") from None


# ================================================================================ subcommands


def cmd_extract(args, session: Session) -> dict:
    from .extract import extract_means

    out = _out(args)
    model, tok = session.model(args)
    harmful = load_dataset(args.harmful, args.n_train, args.seed, "--harmful")
    harmless = load_dataset(args.harmless, args.n_train, args.seed, "--harmless")
    _say(args, f"extracting means: {len(harmful)} harmful + {len(harmless)} harmless prompts")
    means = extract_means(model, tok, {"harmful": _texts(harmful), "harmless": _texts(harmless)},
                          positions=args.positions, layers=args.layers, batch_size=args.batch_size,
                          system_prompt=args.system_prompt, progress=_progress(args))
    path = means.save(out / "means.safetensors")
    _say(args, f"wrote {path} (layers {means.layers[0]}..{means.layers[-1]}, positions {means.positions})")
    return {"model": model, "means": means}


def cmd_select(args, session: Session) -> dict:
    from .extract import Means
    from .select import NoDirectionError, select_direction

    out = _out(args)
    model, tok = session.model(args)
    means_path = _default_path(args.means, args, "means.safetensors")
    if not means_path.is_file():
        raise CLIError(f"means file not found: {means_path} "
                       f"(run `{PROG} extract --out {args.out}` first, or pass --means)")
    try:
        means = Means.load(means_path, model=model, allow_other_weights=args.allow_other_weights)
    except ValueError as exc:
        raise CLIError(f"{means_path}: {exc} (--model {args.model})") from None
    if not {"harmful", "harmless"} <= set(means.groups):
        raise CLIError(f"{means_path} has groups {means.groups}; select needs 'harmful' and 'harmless'")
    hv = load_dataset(args.harmful_val, args.n_val, args.seed, "--harmful-val")
    lv = load_dataset(args.harmless_val, args.n_val, args.seed, "--harmless-val")
    n_l, n_p = len(args.layers or means.layers), len(args.positions or means.positions)
    _say(args, f"selecting the direction: {n_l} layers x {n_p} positions = {n_l * n_p} candidates, "
               f"{len(hv)} harmful + {len(lv)} harmless validation prompts")
    try:
        result = select_direction(
            model, tok, means, _texts(hv), _texts(lv), layers=args.layers, positions=args.positions,
            prune_last_frac=args.prune_last_frac, kl_threshold=args.kl_threshold,
            induce_threshold=args.induce_threshold, batch_size=args.batch_size,
            candidates_per_pass=args.candidates_per_pass, skip_pruned=args.skip_pruned,
            system_prompt=args.system_prompt, progress=_progress(args), allow_other_weights=args.allow_other_weights)
    except NoDirectionError as exc:
        exc.result.to_json(out / "selection.json")
        exc.result.heatmap(out / "selection_heatmap.png")
        raise CLIError(f"{exc}\n(the score table and heatmap were written to {out}; on the command line relax "
                       f"a filter with --kl-threshold / --induce-threshold / --prune-last-frac, "
                       f"'none' disables it)") from None
    _write_selection(args, out, result)
    return {"model": model, "selection": result}


def _write_selection(args, out: Path, result) -> None:
    """selection.json, selection_heatmap.png and direction.safetensors of a chosen direction."""
    result.to_json(out / "selection.json")
    result.heatmap(out / "selection_heatmap.png", title=f"Direction selection: {args.model}")
    save_direction(out / "direction.safetensors", result.raw,
                   {"layer": result.layer, "position": result.position, "kind": "difference-in-means (raw)",
                    "model": args.model, "model_identity": result.params.get("model_identity"),
                    "allow_other_weights": bool(result.params.get("allow_other_weights"))})
    _say(args, f"selected layer {result.layer}, position {result.position}: {result!r}")
    _say(args, f"wrote {out / 'selection.json'}, {out / 'selection_heatmap.png'}, {out / 'direction.safetensors'}")


def _select_relaxing_kl(args, session: Session) -> float | None:
    """Re-pick the direction from the scores ``select`` just wrote, relaxing the KL filter step by step
    (:meth:`SelectionResult.refilter_relaxing_kl`: 0.2, 0.5, 1, then off; nothing re-scored).
    Returns the threshold used (None = filter off)."""
    from .extract import Means
    from .select import NoDirectionError, SelectionResult

    out = _out(args)
    model, _ = session.model(args)
    scored = SelectionResult.from_json(out / "selection.json")
    means = Means.load(out / "means.safetensors", model=model, allow_other_weights=args.allow_other_weights)
    try:
        result = scored.refilter_relaxing_kl(means)
    except NoDirectionError as exc:
        raise CLIError(f"{exc}\n(even with the KL filter off)") from None
    _write_selection(args, out, result)
    return result.params["kl_threshold"]


def _eval_classifiers(primary: str):
    from .evaluate import PrefixRefusalClassifier, SubstringRefusalClassifier

    sub, pre = SubstringRefusalClassifier(), PrefixRefusalClassifier()
    return [sub, pre] if primary == "substring" else [pre, sub]


def cmd_eval(args, session: Session) -> dict:
    import torch

    from .analysis import random_like
    from .evaluate import evaluate_prompts, kl_divergence, last_token_logprobs
    from .interventions import ablate, add

    out = _out(args)
    model, tok = session.model(args)
    dpath = _default_path(args.direction, args, "selection.json")
    if not dpath.is_file():
        raise CLIError(f"direction not found: {dpath} "
                       f"(run `{PROG} select --out {args.out}` first, or pass --direction)")
    d = _load_any_direction(dpath)
    transfer = _check_direction_model(args, d, model)
    from .models import get_adapter

    ad = get_adapter(model)
    if d["raw"].shape[-1] != ad.d_model:
        raise CLIError(f"{dpath}: direction has width {d['raw'].shape[-1]} but the model's d_model is {ad.d_model}")
    conds = list(args.conditions)
    act_layer = args.actadd_layer if args.actadd_layer is not None else d["layer"]
    if any(c.endswith("actadd") for c in conds):
        if act_layer is None:
            raise CLIError("actadd needs a layer: the direction file has none; pass --actadd-layer")
        act_layer = ad.check_layers(int(act_layer), "--actadd-layer")[0]
    affine_mean = None
    if "ablate_affine" in conds:
        affine_mean = _harmless_mean(args, model, d)

    splits = {
        "harmful": load_dataset(args.harmful, args.n_harmful, args.seed, "--harmful"),
        "harmless": load_dataset(args.harmless, args.n_harmless, args.seed, "--harmless"),
    }
    rnd_seed = args.seed
    match_dims, random_info = None, {"kind": args.random_control, "seed": rnd_seed}
    if "random_ablate" in conds and random_info["kind"] == "matched":
        from .analysis import massive_activation_dims

        scan = massive_activation_dims(model, tok, _texts(splits["harmless"])[:8], batch_size=args.batch_size,
                                       system_prompt=args.system_prompt)
        match_dims = scan.dims
        random_info.update(massive_activation_dims=scan.dims, massive_max_abs=scan.max_abs)
        _say(args, f"eval: random_ablate matched on massive-activation coordinates {scan.dims or 'none found'}")
    contexts: dict[str, Callable[[], Any]] = {
        "baseline": contextlib.nullcontext,
        "ablate": lambda: ablate(model, d["direction"]),
        "ablate_affine": lambda: ablate(model, d["direction"], mean=affine_mean),
        "random_ablate": lambda: ablate(model, random_like(d["direction"], rnd_seed, match_dims=match_dims)),
        "actadd": lambda: add(model, d["raw"], layers=[act_layer], alpha=args.actadd_alpha),
        "random_actadd": lambda: add(model, random_like(d["raw"], rnd_seed + 1), layers=[act_layer],
                                     alpha=args.actadd_alpha),
    }
    clfs = _eval_classifiers(args.classifier)
    need_kl = [c for c in conds if c != "baseline" and "harmless" in _CONDITION_SPLITS[c]]
    harmless_texts = _texts(splits["harmless"])
    ref = None
    if need_kl:
        ref = last_token_logprobs(model, tok, harmless_texts, batch_size=args.batch_size,
                                  system_prompt=args.system_prompt, device="cpu", dtype=torch.float32)
    results: dict[str, dict] = {}
    records: dict[str, dict] = {}
    kl: dict[str, float] = {}
    for c in conds:
        results[c], records[c] = {}, {}
        for split in _CONDITION_SPLITS[c]:
            rows = splits[split]
            _say(args, f"eval: {c} on {len(rows)} {split} prompts")
            with contexts[c]():
                res = evaluate_prompts(model, tok, _texts(rows), categories=[r["category"] for r in rows],
                                       classifier=clfs, max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size, system_prompt=args.system_prompt,
                                       progress=_progress(args))
                if split == "harmless" and c in need_kl:
                    kl[c] = float(kl_divergence(model, tok, harmless_texts, reference=ref, batch_size=args.batch_size,
                                                system_prompt=args.system_prompt, reduction="mean"))
            records[c][split] = res.pop("records")
            results[c][split] = res
    examples = {}
    for split, rows in splits.items():
        items = []
        for i in range(min(max(args.n_examples, 0), len(rows))):
            comps = {c: records[c][split][i]["completion"] for c in conds if split in records[c]}
            items.append({"instruction": rows[i]["instruction"], "completions": comps})
        examples[split] = items
    ev = {
        "format": "refusal_fast.eval", "version": 1, "model": args.model,
        "direction": {"source": d["source"], "layer": d["layer"], "position": d["position"],
                      "norm": float(d["raw"].norm()), "actadd_layer": act_layer,
                      "actadd_alpha": args.actadd_alpha, "model_identity": d.get("model_identity"),
                      "allow_other_weights": transfer is not None},
        "model_identity": model_identity(model),
        "classifier": results[conds[0]][_CONDITION_SPLITS[conds[0]][0]]["classifier"],
        "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "datasets": {s: {"source": getattr(args, s), "n": len(rows)} for s, rows in splits.items()},
        "conditions": results, "kl_harmless": kl, "examples": examples,
    }
    if "random_ablate" in conds:
        ev["random_control"] = random_info
    write_json(out / "eval.json", ev)
    write_json(out / "eval_completions.json", {"format": "refusal_fast.eval_completions", "records": records})
    from .report import eval_summary_rows, format_summary_table

    print(format_summary_table(eval_summary_rows(ev)))
    _say(args, f"wrote {out / 'eval.json'} and {out / 'eval_completions.json'}")
    return {"model": model, "eval": ev}


def _harmless_mean(args, model, d: dict):
    """``{layer: [d_model]}`` harmless mean at the direction's position, for affine ablation."""
    from .extract import Means

    mpath = _default_path(args.means, args, "means.safetensors")
    if not mpath.is_file():
        raise CLIError(f"ablate_affine needs the harmless mean: {mpath} not found (pass --means)")
    try:
        means = Means.load(mpath, model=model, allow_other_weights=args.allow_other_weights)
    except ValueError as exc:
        raise CLIError(f"{mpath}: {exc} (--model {args.model})") from None
    if "harmless" not in means.groups:
        raise CLIError(f"{mpath} has no 'harmless' group")
    pos = d["position"] if d["position"] in means.positions else means.positions[-1]
    m = means.mean("harmless")[:, means.positions.index(pos)]
    return {layer: m[i] for i, layer in enumerate(means.layers)}


def _plots():
    try:
        from .analysis import plots
    except ImportError:
        return None
    return plots


def _save_fig(args, fn_name: str, result, path: Path, **kw) -> None:
    """Draw one figure through refusal_fast.analysis.plots (skipped with a note if unavailable)."""
    plots = _plots()
    fn = getattr(plots, fn_name, None) if plots is not None else None
    if fn is None:
        _say(args, f"note: plotting function analysis.plots.{fn_name} is not available; {path.name} not drawn")
        return
    fn(result, path=path, close=True, **kw)


def _auto_from_selection(args) -> dict:
    p = Path(args.out) / "selection.json"
    if not p.is_file():
        return {}
    try:
        sel = read_json(p, "selection result")
    except ArtifactError:
        return {}
    return {"layer": sel.get("layer"), "position": sel.get("position")} if isinstance(sel, dict) else {}


def cmd_categories(args, session: Session) -> dict:
    from .analysis import (
        EvalConfig,
        category_directions,
        category_pca,
        cosine_similarity,
        cross_ablation,
        split_prompts,
        subspace_ablation,
    )

    out = _out(args)
    model, tok = session.model(args)
    rows = load_dataset(args.data, None, args.seed, "--data")
    cats: dict[str, list[str]] = {}
    for r in rows:
        if r["category"]:
            cats.setdefault(r["category"], []).append(r["instruction"])
    if len(cats) < 2:
        raise CLIError(f"--data {args.data}: needs prompts of at least 2 categories (a 'category' field), "
                       f"found {len(cats)}")
    if args.n_per_category is not None:
        rng = random.Random(args.seed)
        cats = {c: (rng.sample(ps, args.n_per_category) if len(ps) > args.n_per_category else ps)
                for c, ps in cats.items()}
    if not 0.0 < args.holdout < 1.0:
        raise CLIError(f"--holdout must be in (0, 1), got {args.holdout}")
    small = sorted(c for c, ps in cats.items() if len(ps) < 2)
    if small:
        raise CLIError(f"categories {small} have fewer than 2 prompts: too few to hold any out")
    train, held = split_prompts(cats, holdout=args.holdout, seed=args.seed)
    harmless = _texts(load_dataset(args.harmless, args.n_harmless, args.seed, "--harmless"))
    auto = _auto_from_selection(args)
    layer = args.layer
    if layer == "auto":
        # layer 0 is the token embedding: at end-of-instruction positions it is the same for every
        # prompt, so category directions there are zero; fall back to the default depth.
        layer = auto.get("layer") if (auto.get("layer") or 0) >= 1 else None
    elif layer == "default":
        layer = None
    position = args.position
    if position in ("auto", "default", "select"):
        position = auto.get("position") if position == "auto" and auto.get("position") is not None else -1
    kwargs: dict[str, Any] = {}
    if layer == "select":
        hv = load_dataset(DEFAULTS["harmless_val"], max(4, min(32, len(harmless))), args.seed, "harmless validation")
        kwargs = {"val_prompts": held, "harmless_val": _texts(hv)}
    _say(args, f"category directions: {len(cats)} categories ({sum(map(len, train.values()))} train, "
               f"{sum(map(len, held.values()))} held-out prompts), {len(harmless)} harmless; layer "
               f"{'60% depth' if layer is None else layer}, position {position}")
    cd = category_directions(model, tok, train, harmless, layer=layer, position=int(position),
                             batch_size=args.batch_size, system_prompt=args.system_prompt,
                             progress=_progress(args), **kwargs)
    cd.save(out / "category_directions.safetensors")
    cos = cosine_similarity(cd)
    pca = category_pca(cd)
    cfg = EvalConfig(generate=args.generate, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     system_prompt=args.system_prompt, progress=_progress(args))
    result: dict[str, Any] = {"format": "refusal_fast.categories", "version": 1, "model": args.model,
                              "data": args.data, "holdout": args.holdout, "seed": args.seed,
                              "model_identity": cd.model,
                              "directions": cd.to_dict(), "cosine": cos.to_dict(), "pca": pca.to_dict(),
                              "cross_ablation": None, "subspace_ablation": None}
    xab = sub = None
    if not args.no_cross:
        _say(args, f"cross-category ablation ({len(cd.categories) + 1} directions x {len(held)} categories"
                   f"{' with generation' if args.generate else ''})")
        xab = cross_ablation(model, tok, cd, held, cfg=cfg, n_random=args.n_random, seed=args.seed)
        result["cross_ablation"] = xab.to_dict()
    if not args.no_subspace:
        _say(args, f"subspace ablation (k = {args.ks})")
        sub = subspace_ablation(model, tok, cd, held, ks=args.ks, pca=pca, cfg=cfg, n_random=args.n_random,
                                seed=args.seed)
        result["subspace_ablation"] = sub.to_dict()
    write_json(out / "categories.json", result)
    _save_fig(args, "plot_cosine", cos, out / "categories_cosine.png")
    _save_fig(args, "plot_cosine_by_layer", cos, out / "categories_cosine_by_layer.png")
    _save_fig(args, "plot_pca", pca, out / "categories_pca.png")
    if xab is not None:
        _save_fig(args, "plot_cross_ablation", xab, out / "categories_cross_ablation.png")
    if sub is not None:
        _save_fig(args, "plot_subspace_ablation", sub, out / "categories_subspace.png")
    _say(args, f"PCA: {pca.n_components_90} component(s) reach 90% of the variance; wrote {out / 'categories.json'}")
    return {"model": model, "categories": result}


def _best_steer(sweep) -> tuple[int, float]:
    """(layer, alpha) of the sweep with the lowest refusal score."""
    import numpy as np

    s = np.asarray(sweep.refusal_score, dtype=float)
    if not np.isfinite(s).any():
        return sweep.layers[len(sweep.layers) // 2], float(sweep.alphas[-1])
    i, j = np.unravel_index(np.nanargmin(s), s.shape)
    return int(sweep.layers[i]), float(sweep.alphas[j])


def cmd_persona(args, session: Session) -> dict:
    from .analysis import (
        EvalConfig,
        load_persona_prompts,
        persona_direction,
        refusal_readd,
        steering_sweep,
        window_knockout,
    )
    from .models import get_adapter

    out = _out(args)
    model, tok = session.model(args)
    try:
        compliant, refusing = load_persona_prompts(args.persona_prompts)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    instr = _texts(load_dataset(args.instructions, args.n_instructions, args.seed, "--instructions"))
    harmful = _texts(load_dataset(args.harmful, args.n_harmful, args.seed + 1, "--harmful"))
    _say(args, f"persona direction: {len(compliant)} compliant + {len(refusing)} refusing system prompts x "
               f"{len(instr)} instructions")
    pd = persona_direction(model, tok, instr, compliant, refusing, batch_size=args.batch_size,
                           progress=_progress(args))
    pd.save(out / "persona_direction.safetensors")
    n_layers = get_adapter(model).n_layers
    layers = args.layers
    if layers is None:
        nz = pd.nonzero_layers()
        if not nz:
            raise CLIError("the persona direction is zero at every layer (do the persona prompts differ?)")
        k = min(6, len(nz))
        layers = sorted({nz[round(i * (len(nz) - 1) / max(k - 1, 1))] for i in range(k)})
    cfg = EvalConfig(generate=args.generate, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     system_prompt=args.system_prompt, progress=_progress(args))
    _say(args, f"steering sweep: layers {layers} x alphas {args.alphas or 'default'} on {len(harmful)} harmful prompts")
    sweep = steering_sweep(model, tok, pd, harmful, layers=layers, alphas=args.alphas, norm_match=args.norm_match,
                           alpha_unit=args.alpha_unit, cfg=cfg)
    b_layer, b_alpha = _best_steer(sweep)
    steer_layer = args.steer_layer if args.steer_layer is not None else b_layer
    alpha = args.alpha if args.alpha is not None else b_alpha
    if steer_layer >= n_layers - 1:
        steer_layer = max(1, n_layers - 2)
    result: dict[str, Any] = {"format": "refusal_fast.persona", "version": 1, "model": args.model,
                              "model_identity": pd.model,
                              "steer_layer": steer_layer, "alpha": alpha, "direction": pd.to_dict(),
                              "sweep": sweep.to_dict(), "readd": None, "knockout": None}
    readd = None
    dpath = _default_path(args.direction, args, "selection.json")
    if dpath.is_file():
        d = _load_any_direction(dpath)
        _check_direction_model(args, d, model)
        _say(args, f"late refusal re-add while steering at layer {steer_layer}, alpha {alpha}")
        readd = refusal_readd(model, tok, pd, d["raw"], harmful, steer_layer, alpha, norm_match=args.norm_match,
                              alpha_unit=args.alpha_unit, n_random=args.n_random, seed=args.seed, cfg=cfg)
        result["readd"] = readd.to_dict()
    else:
        _say(args, f"no refusal direction at {dpath}: skipping the re-add experiment")
    _say(args, f"window knockout while steering at layer {steer_layer}")
    ko = window_knockout(model, tok, pd, harmful, steer_layer, alpha, norm_match=args.norm_match,
                         alpha_unit=args.alpha_unit, n_random=args.n_random, seed=args.seed, cfg=cfg)
    result["knockout"] = ko.to_dict()
    write_json(out / "persona.json", result)
    _save_fig(args, "plot_persona_norms", pd, out / "persona_direction_norms.png")
    _save_fig(args, "plot_steering_alpha", sweep, out / "persona_steering_alpha.png")
    _save_fig(args, "plot_steering_layer", sweep, out / "persona_steering_layer.png")
    if readd is not None:
        _save_fig(args, "plot_readd", readd, out / "persona_readd.png")
    _save_fig(args, "plot_knockout", ko, out / "persona_knockout.png")
    _say(args, f"wrote {out / 'persona.json'}")
    return {"model": model, "persona": result}


def cmd_export(args, session: Session) -> dict:
    from .weight_edit import orthogonalize

    out = _out(args)
    model, tok = session.model(args)
    dpath = _default_path(args.direction, args, "selection.json")
    if not dpath.is_file():
        raise CLIError(f"direction not found: {dpath} "
                       f"(run `{PROG} select --out {args.out}` first, or pass --direction)")
    d = _load_any_direction(dpath)
    transfer = _check_direction_model(args, d, model)
    target = Path(args.export_dir) if args.export_dir else out / "orthogonalized"
    _say(args, f"orthogonalizing the weights against {dpath} and saving to {target}")
    source = model_identity(model)
    rec = orthogonalize(model, d["direction"])
    try:
        check_writable(target, "export directory")
        model.save_pretrained(str(target))
        tok.save_pretrained(str(target))
        write_json(target / "refusal_fast_export.json", {
            "source_model": args.model, "direction": d["source"], "layer": d["layer"], "position": d["position"],
            "edited": list(rec.edited), "untied": bool(rec.untied), "library_version": version(),
            "source_model_identity": source,
            "exported_weights_fingerprint": model_identity(model)["weights_fingerprint"],
            "direction_model_identity": d.get("model_identity"), "allow_other_weights": transfer is not None,
        })
    finally:
        rec.undo()  # the in-memory model is left as it was
    _say(args, f"wrote {target} ({len(rec.edited)} weight tensors edited)")
    return {"model": model, "export_dir": target}


def cmd_report(args, session: Session) -> dict:
    from .report import write_report

    out = Path(args.out)
    if not out.is_dir():
        raise CLIError(f"output directory not found: {out} (run some commands with --out {out} first)")
    path = write_report(out, args.output, title=args.title)
    print(path)
    return {"report": path}


def cmd_demo(args, session: Session) -> dict:
    """extract -> select -> eval -> categories (-> persona) -> report, sharing one loaded model.

    Each step is parsed exactly like the corresponding subcommand (:meth:`Session.run_argv`)."""
    q = 1 if args.quick else 0
    size = {k: (getattr(args, k) if getattr(args, k) is not None else v[q]) for k, v in DEMO_SIZES.items()}
    common = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--out", args.out,
              "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.trust_remote_code:
        common.append("--trust-remote-code")
    if args.allow_other_weights:
        common.append("--allow-other-weights")
    if args.no_progress:
        common.append("--no-progress")
    if args.system_prompt is not None:
        common += ["--system-prompt", args.system_prompt]
    layers = args.select_layers
    if layers is None:
        from .models import get_adapter

        layers = demo_select_layers(get_adapter(session.model(args)[0]).n_layers)
    steps: list[list[str]] = [
        ["extract", "--n-train", str(size["n_train"])],
        ["select", "--n-val", str(size["n_val"]), "--prune-last-frac", str(args.prune_last_frac),
         "--kl-threshold", str(args.kl_threshold), "--induce-threshold", str(args.induce_threshold), "--skip-pruned"]
        + [f"--layers={','.join(map(str, layers))}"]
        + ([f"--positions={','.join(map(str, args.select_positions))}"] if args.select_positions else []),
        ["eval", "--n-harmful", str(size["n_harmful"]), "--n-harmless", str(size["n_harmless"]),
         "--max-new-tokens", str(size["max_new_tokens"]),
         "--conditions", "baseline,ablate,actadd" if args.quick else "baseline,ablate,random_ablate,actadd"],
    ]
    if not args.skip_categories:
        steps.append(["categories", "--n-per-category", str(size["n_category"]),
                      "--n-harmless", str(size["n_category_harmless"]), "--ks", "1,2,3"])
    if args.persona:
        steps.append(["persona", "--n-instructions", str(size["n_val"]), "--n-harmful", str(size["n_val"])])
    t0 = time.perf_counter()
    for i, step in enumerate(steps, 1):
        _say(args, f"demo step {i}/{len(steps)}: {step[0]}")
        try:
            session.run_argv(step + common)
        except CLIError:
            if step[0] != "select" or args.kl_threshold is None:
                raise
            # No candidate passed the KL filter: say so loudly, and re-pick from the same scores with the
            # KL filter relaxed step by step (no re-scoring) so the newcomer still sees the pipeline.
            print(f"[refusal-fast] WARNING: no candidate direction passed KL <= {args.kl_threshold}; "
                  "relaxing the KL filter step by step over the same scores", flush=True)
            thr = _select_relaxing_kl(args, session)
            print(f"[refusal-fast] WARNING: picked with {'the KL filter off' if thr is None else f'KL <= {thr}'}: "
                  "the chosen direction changes harmless outputs more than the standard procedure allows "
                  "(see the report)", flush=True)
    path = session.run_argv(["report", "--out", args.out], quiet=True)["report"]
    ev = read_json(Path(args.out) / "eval.json", "eval.json")  # the summary below is read back from the same file
    from .report import eval_summary_rows, format_summary_table

    print()
    print(f"refusal-fast demo: {args.model}, direction at layer {ev['direction']['layer']}, "
          f"position {ev['direction']['position']}; {ev['datasets']['harmful']['n']} harmful / "
          f"{ev['datasets']['harmless']['n']} harmless evaluation prompts, {ev['classifier']} classifier")
    print(format_summary_table(eval_summary_rows(ev)))
    print(f"\nreport: {Path(path).resolve()}   ({time.perf_counter() - t0:.0f} s)")
    return {"report": path, "eval": ev}
