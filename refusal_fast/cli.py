"""The ``refusal-fast`` command line.

Subcommands (``refusal-fast <cmd> --help`` explains every option)::

    extract     difference-in-means extraction          -> means.safetensors (+ .json)
    select      choose the refusal direction             -> selection.json, selection_heatmap.png, direction.safetensors
    eval        refusal before/after ablation, actadd    -> eval.json, eval_completions.json
    ablate      eval with --conditions baseline,ablate   -> eval.json, eval_completions.json
    categories  per-category directions, cosine, PCA, cross/subspace ablation -> categories.json + PNGs
    persona     persona direction, steering sweep, re-add, knockout           -> persona.json + PNGs
    export      orthogonalized weights (save_pretrained) -> <out>/orthogonalized/
    report      one self-contained HTML page             -> report.html
    demo        the whole pipeline on the shipped demo model, then the report

Every command writes into ``--out`` and records what it did in ``<out>/run.json``; later
commands read earlier artifacts from the same directory by default. The CLI only calls the
library's public functions (extraction, selection, interventions, evaluation, analysis).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .commands import (
    CONDITIONS,
    DEFAULTS,
    DEMO_SIZES,
    PROG,
    Session,
    cmd_categories,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_extract,
    cmd_persona,
    cmd_report,
    cmd_select,
    open_outputs,
    run_command,
    version,
)
from .io import CLIError

# =============================================================================== argument types


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _size(text: str) -> int | None:
    """A prompt count: positive int, or 'all'."""
    if str(text).lower() == "all":
        return None
    return _positive_int(text)


def _int_list(text: str) -> list[int]:
    """'3', '1,4,7', '10:20' (half open), '0:30:5', mixed with commas; negatives allowed."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                bits = [int(b) for b in part.split(":")]
                if len(bits) not in (2, 3):
                    raise ValueError(part)
                out.extend(range(*bits))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like '12', '3,5,7' or a range '10:20' (start:stop[:step]), got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return out


def _float_list(text: str) -> list[float]:
    try:
        out = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return out


def _threshold(text: str) -> float | None:
    if str(text).lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _conditions(text: str) -> list[str]:
    items = [c.strip() for c in str(text).split(",") if c.strip()]
    bad = [c for c in items if c not in CONDITIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown condition(s) {bad or text!r}; choose from {', '.join(CONDITIONS)}")
    return list(dict.fromkeys(items))


def _layer_arg(text: str) -> int | str | None:
    t = str(text).lower()
    if t in ("auto", "select", "default"):
        return t
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'auto', 'default' or 'select', got {text!r}") from None


# ================================================================================= the parser


class _Formatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the default is None/False or already described."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, _term_width()))

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        d = action.default
        if ("default" in h.lower() or d is None or d is False or d == argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return h
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        return f"{h} (default: {shown})"


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _common_parents(out_default: str = DEFAULTS["out"]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Fresh parent parsers (model options, run options) for one subcommand."""
    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("--model", default="demo", metavar="PATH",
                   help="local model directory written by save_pretrained (model + tokenizer with a chat template), "
                        "or 'demo' (the refusal-patched SmolLM2-135M-Instruct) / 'demo-base' (unpatched)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype the model is loaded in")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modelling code shipped with the checkpoint (off by default: only built-in "
                        "transformers architectures load)")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system prompt rendered into every prompt (default: none; the template's own default applies)")
    g.add_argument("--allow-other-weights", action="store_true",
                   help="use means / directions computed from another model of the same architecture and size "
                        "(e.g. a base model's direction on its fine-tune); without it a weights-fingerprint or "
                        "config mismatch is an error. Recorded in run.json and the artifacts")

    run = argparse.ArgumentParser(add_help=False)
    g = run.add_argument_group("run")
    g.add_argument("--out", default=out_default, metavar="DIR",
                   help="output directory: artifacts are written here and earlier ones read from here")
    g.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="prompts per forward pass")
    g.add_argument("--seed", type=int, default=0, help="seed for prompt subsets and random-direction controls")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return model, run


def _data_help(default: str, role: str) -> str:
    return f"{role} (DATA, see below)"


_DATA_EPILOG = ("DATA is a shipped dataset name (harmful_train, harmful_val, harmless_train, harmless_val, "
                "harmbench_test, harmbench_val, advbench) or a JSON file holding a list of strings or of objects "
                "with an 'instruction' (and optional 'category') field; join several with '+', e.g. "
                "harmful_val+harmbench_test. N options take a count or 'all'; subsets are drawn with --seed.")


def build_parser() -> argparse.ArgumentParser:
    """The ``refusal-fast`` argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Refusal-direction research on transformer chat models: extract difference-in-means "
                    "directions, select the refusal direction, ablate / add it, analyse categories and personas, "
                    "export orthogonalized weights and write an HTML report.",
        epilog="Start with `refusal-fast demo` (offline, a few minutes on a laptop CPU). "
               "Run `refusal-fast <command> --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    parents = list(_common_parents())  # re-created per subcommand below where a default differs

    # ---------------------------------------------------------------------------------- extract
    p = sub.add_parser("extract", parents=parents, formatter_class=_Formatter, epilog=_DATA_EPILOG,
                       help="mean activations of harmful and harmless prompts (means.safetensors)",
                       description="Stream harmful and harmless prompts through the model and accumulate the mean "
                                   "residual-stream activation at every layer and end-of-instruction position. "
                                   "Writes OUT/means.safetensors (+ means.json).")
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    # ----------------------------------------------------------------------------------- select
    p = sub.add_parser("select", parents=parents, formatter_class=_Formatter, epilog=_DATA_EPILOG,
                       help="choose the refusal direction among the candidates (selection.json + heatmap)",
                       description="Score every (layer, position) difference-in-means candidate on validation "
                                   "prompts (bypass: refusal with it ablated; induce: refusal with it added; KL on "
                                   "harmless) and keep the best one that passes the filters (Arditi et al. 2024). "
                                   "Writes OUT/selection.json, OUT/selection_heatmap.png and "
                                   "OUT/direction.safetensors.")
    _add_select_args(p)
    p.set_defaults(func=cmd_select)

    # ------------------------------------------------------------------------------ eval/ablate
    for name, conds, hlp in (
        ("eval", "baseline,ablate,actadd",
         "refusal rate before/after ablating the direction and with activation addition (eval.json)"),
        ("ablate", "baseline,ablate",
         "alias of `eval --conditions baseline,ablate`: refusal with the direction ablated (eval.json)"),
    ):
        p = sub.add_parser(name, parents=parents, formatter_class=_Formatter, help=hlp,
                           description="Generate greedy completions for harmful and harmless evaluation prompts "
                                       "under each condition and classify refusals; also the refusal score and, on "
                                       "harmless prompts, the KL divergence to the unmodified model. Conditions: "
                                       "baseline (none), ablate (project the direction out at every layer), "
                                       "ablate_affine (set its component to the harmless mean's), random_ablate "
                                       "(a random direction: control), actadd (add the raw difference-in-means "
                                       "vector at its layer, on harmless prompts), random_actadd (control). "
                                       "Writes OUT/eval.json (summary) and OUT/eval_completions.json "
                                       "(every completion)."
                                       + (" `ablate` is `eval` with --conditions baseline,ablate by default."
                                          if name == "ablate" else ""))
        _add_eval_args(p, conds)
        p.set_defaults(func=cmd_eval)

    # ------------------------------------------------------------------------------- categories
    p = sub.add_parser("categories", parents=parents, formatter_class=_Formatter, epilog=_DATA_EPILOG,
                       help="per-category directions: cosine, PCA, cross-category and subspace ablation",
                       description="One extraction pass with one group per harm category (prompts with a 'category' "
                                   "field) against a shared harmless group; cosine similarity of the category "
                                   "directions, PCA spectrum, the cross-category ablation matrix (ablate category "
                                   "i's direction, measure refusal on category j's held-out prompts) and rank-k "
                                   "subspace ablation, each beside a seeded random-direction null. Writes "
                                   "OUT/categories.json, OUT/category_directions.safetensors and categories_*.png.")
    _add_categories_args(p)
    p.set_defaults(func=cmd_categories)

    # ---------------------------------------------------------------------------------- persona
    p = sub.add_parser("persona", parents=parents, formatter_class=_Formatter, epilog=_DATA_EPILOG,
                       help="persona direction, steering sweep, late refusal re-add, window knockout",
                       description="Persona direction = mean last-token activation under compliant-persona system "
                                   "prompts minus under refusing-persona ones; then steer with it over layers x "
                                   "alphas, re-add the refusal direction at later layers while steering, and "
                                   "knock the persona direction out in layer windows (vs random directions). "
                                   "Writes OUT/persona.json, OUT/persona_direction.safetensors and persona_*.png.")
    _add_persona_args(p)
    p.set_defaults(func=cmd_persona)

    # ----------------------------------------------------------------------------------- export
    p = sub.add_parser("export", parents=parents, formatter_class=_Formatter, epilog=_DATA_EPILOG,
                       help="save orthogonalized weights (the direction removed permanently)",
                       description="Orthogonalize every weight that writes into the residual stream against the "
                                   "refusal direction (the permanent form of `ablate`) and save the model and "
                                   "tokenizer with save_pretrained, loadable by any transformers-compatible server.")
    p.add_argument("--direction", default=None, metavar="FILE",
                   help="direction to remove: a selection.json or a direction .safetensors "
                        "(default OUT/selection.json)")
    p.add_argument("--export-dir", default=None, metavar="DIR", help="where to save (default OUT/orthogonalized)")
    p.set_defaults(func=cmd_export)

    # ----------------------------------------------------------------------------------- report
    p = sub.add_parser("report", formatter_class=_Formatter,
                       help="write one self-contained HTML report from an output directory",
                       description="Collect the artifacts in OUT (run.json, selection.json, eval.json, "
                                   "categories.json, persona.json and their PNG figures) into one HTML page with "
                                   "embedded images. Sections whose artifacts are missing say 'not run'.")
    p.add_argument("--out", default=DEFAULTS["out"], metavar="DIR", help="directory holding the artifacts")
    p.add_argument("--output", default=None, metavar="FILE", help="HTML file to write (default OUT/report.html)")
    p.add_argument("--title", default=None, help="page title (default: from the model name)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_report)

    # ------------------------------------------------------------------------------------- demo
    p = sub.add_parser("demo", parents=list(_common_parents("demo_out")), formatter_class=_Formatter,
                       help="the whole pipeline on the demo model, then the report (start here)",
                       description="Load the model (default: the refusal-patched demo model), extract means on "
                                   "train prompts, select the direction on validation prompts, evaluate refusal "
                                   "before/after ablation and with activation addition (generation + classifier), "
                                   "run the per-category analysis, write OUT/report.html and print a summary. "
                                   "Offline; a few minutes on 2 CPU cores (--quick: well under a minute).")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test: " + ", ".join(f"{k}={v[1]}" for k, v in DEMO_SIZES.items()))
    for key, hlp in (("n_train", "harmful and harmless train prompts each (extraction)"),
                     ("n_val", "harmful and harmless validation prompts each (selection)"),
                     ("n_harmful", "harmful evaluation prompts (harmful_val + harmbench_test)"),
                     ("n_harmless", "harmless evaluation prompts (harmless_val)"),
                     ("max_new_tokens", "tokens generated per completion"),
                     ("n_category", "prompts per harm category (categories step)"),
                     ("n_category_harmless", "harmless prompts in the categories step")):
        p.add_argument("--" + key.replace("_", "-"), type=_positive_int, default=None, metavar="N",
                       help=f"{hlp} (default {DEMO_SIZES[key][0]}, --quick {DEMO_SIZES[key][1]})")
    g = p.add_argument_group("selection (as in `select`)")
    g.add_argument("--select-layers", type=_int_list, default=None, metavar="LIST",
                   help="candidate layers, e.g. '4:24:2' (default: every layer from 10%% to 80%% depth; "
                        "all layers for models with few)")
    g.add_argument("--select-positions", type=_int_list, default=None, metavar="LIST",
                   help="candidate positions, e.g. --select-positions=-1 (default: every end-of-instruction position)")
    g.add_argument("--prune-last-frac", type=_threshold, default=0.2, metavar="F",
                   help="discard candidates from the last F fraction of layers ('none' keeps all)")
    g.add_argument("--kl-threshold", type=_threshold, default=0.1, metavar="X",
                   help="discard candidates whose ablation gives harmless KL > X ('none' disables); if none "
                        "passes, the demo warns and relaxes it to 0.2, 0.5, 1, then off, over the same scores")
    g.add_argument("--induce-threshold", type=_threshold, default=0.0, metavar="X",
                   help="discard candidates whose addition gives a harmless refusal score below X ('none' disables)")
    p.add_argument("--skip-categories", action="store_true", help="leave out the per-category analysis")
    p.add_argument("--persona", action="store_true", help="also run a small persona experiment (slower)")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("extract")
    g.add_argument("--harmful", default=DEFAULTS["harmful_train"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmful_train"], "harmful prompts"))
    g.add_argument("--harmless", default=DEFAULTS["harmless_train"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmless_train"], "harmless prompts"))
    g.add_argument("--n-train", type=_size, default=128, metavar="N",
                   help="prompts per group (a seeded random subset; 'all' for every prompt)")
    g.add_argument("--layers", type=_int_list, default=None, metavar="LIST",
                   help="layers to extract, e.g. '10:20' or '4,8,12' (default all); layer l = input of block l")
    g.add_argument("--positions", type=_int_list, default=None, metavar="LIST",
                   help="negative token offsets, e.g. --positions=-3,-2,-1 (write '=' before a list that starts "
                        "with '-'; default: the end-of-instruction tokens)")


def _add_select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("select")
    g.add_argument("--means", default=None, metavar="FILE", help="means file (default OUT/means.safetensors)")
    g.add_argument("--harmful-val", default=DEFAULTS["harmful_val"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmful_val"], "harmful validation prompts"))
    g.add_argument("--harmless-val", default=DEFAULTS["harmless_val"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmless_val"], "harmless validation prompts"))
    g.add_argument("--n-val", type=_size, default=32, metavar="N",
                   help="validation prompts per group ('all' for every)")
    g.add_argument("--layers", type=_int_list, default=None, metavar="LIST",
                   help="candidate layers (default every extracted layer)")
    g.add_argument("--positions", type=_int_list, default=None, metavar="LIST",
                   help="candidate positions (default every extracted position)")
    g.add_argument("--prune-last-frac", type=_threshold, default=0.2, metavar="F",
                   help="discard candidates from the last F fraction of layers ('none' keeps all)")
    g.add_argument("--kl-threshold", type=_threshold, default=0.1, metavar="X",
                   help="discard candidates whose ablation changes harmless next-token distributions by KL > X")
    g.add_argument("--induce-threshold", type=_threshold, default=0.0, metavar="X",
                   help="discard candidates whose addition gives a harmless refusal score below X")
    g.add_argument("--candidates-per-pass", type=_positive_int, default=8, metavar="N",
                   help="candidates evaluated together in one batched forward pass")
    g.add_argument("--skip-pruned", action="store_true",
                   help="do not score candidates the layer rule discards anyway (faster; they show as NaN)")


def _add_eval_args(p: argparse.ArgumentParser, conditions: str) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--direction", default=None, metavar="FILE",
                   help="a selection.json or direction .safetensors (default OUT/selection.json)")
    g.add_argument("--harmful", default=DEFAULTS["harmful_eval"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmful_eval"], "harmful evaluation prompts"))
    g.add_argument("--harmless", default=DEFAULTS["harmless_eval"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmless_eval"], "harmless evaluation prompts"))
    g.add_argument("--n-harmful", type=_size, default=64, metavar="N", help="harmful prompts ('all' for every)")
    g.add_argument("--n-harmless", type=_size, default=64, metavar="N", help="harmless prompts ('all' for every)")
    g.add_argument("--conditions", type=_conditions, default=_conditions(conditions), metavar="LIST",
                   help="comma-separated conditions from: " + ", ".join(CONDITIONS))
    g.add_argument("--actadd-layer", type=int, default=None, metavar="L",
                   help="layer for activation addition (default: the direction's layer)")
    g.add_argument("--actadd-alpha", type=float, default=1.0, metavar="A",
                   help="coefficient on the raw difference-in-means vector added in actadd")
    g.add_argument("--means", default=None, metavar="FILE",
                   help="means file for ablate_affine's harmless mean (default OUT/means.safetensors)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens per completion")
    g.add_argument("--classifier", default="substring", choices=["substring", "prefix"],
                   help="refusal classifier defining the refusal rate (the other is reported too)")
    g.add_argument("--n-examples", type=int, default=3, metavar="N",
                   help="example completions per split kept in eval.json for the report")
    g.add_argument("--random-control", default="isotropic", choices=["isotropic", "matched"],
                   help="random_ablate's direction: isotropic Gaussian, or 'matched': equal to the direction on the "
                        "model's massive-activation coordinates (attention-sink values; analysis.outliers) and random "
                        "elsewhere, so the control does not disturb the sink")


def _add_categories_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("categories")
    g.add_argument("--data", default=DEFAULTS["categories"], metavar="DATA",
                   help=_data_help(DEFAULTS["categories"], "categorised harmful prompts (rows need a 'category')"))
    g.add_argument("--harmless", default=DEFAULTS["harmless_train"], metavar="DATA",
                   help=_data_help(DEFAULTS["harmless_train"], "shared harmless prompts"))
    g.add_argument("--n-per-category", type=_size, default=None, metavar="N",
                   help="at most N prompts per category (default all)")
    g.add_argument("--n-harmless", type=_size, default=128, metavar="N", help="harmless prompts")
    g.add_argument("--holdout", type=float, default=0.3, metavar="F",
                   help="fraction of each category held out for the ablation measurements")
    g.add_argument("--layer", type=_layer_arg, default="auto", metavar="L",
                   help="layer of the category directions: an int; 'auto' (the layer in OUT/selection.json if "
                        "present, else 60%% depth); 'default' (60%% depth); 'select' (per-category selection, slow)")
    g.add_argument("--position", type=_layer_arg, default="auto", metavar="P",
                   help="negative token offset read; 'auto' = the position in OUT/selection.json if present, else -1")
    g.add_argument("--ks", type=_int_list, default=[1, 2, 3, 4, 5], metavar="LIST",
                   help="ranks k of the top-k principal-component subspace ablation")
    g.add_argument("--n-random", type=_positive_int, default=1, metavar="N",
                   help="random directions per ablation (null control)")
    g.add_argument("--no-cross", action="store_true", help="skip the cross-category ablation matrix")
    g.add_argument("--no-subspace", action="store_true", help="skip the rank-k subspace ablation")
    g.add_argument("--generate", action="store_true",
                   help="also generate completions and report classifier refusal rates (slow); default: "
                        "refusal score only")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens per completion")


def _add_persona_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("persona")
    g.add_argument("--persona-prompts", default=None, metavar="FILE",
                   help="JSON {'compliant': [...], 'refusing': [...]} of system prompts (default: the shipped 8+8)")
    g.add_argument("--instructions", default=DEFAULTS["persona_instructions"], metavar="DATA",
                   help=_data_help(DEFAULTS["persona_instructions"], "instructions for the persona direction"))
    g.add_argument("--n-instructions", type=_size, default=16, metavar="N", help="instructions for the direction")
    g.add_argument("--harmful", default=DEFAULTS["persona_harmful"], metavar="DATA",
                   help=_data_help(DEFAULTS["persona_harmful"], "harmful prompts the steering is evaluated on"))
    g.add_argument("--n-harmful", type=_size, default=16, metavar="N", help="harmful evaluation prompts")
    g.add_argument("--layers", type=_int_list, default=None, metavar="LIST",
                   help="steering layers of the sweep (default: 6 evenly spaced layers)")
    g.add_argument("--alphas", type=_float_list, default=None, metavar="LIST",
                   help="steering strengths (default 0.5,1,2,4; with --norm-match 0.1,0.25,0.5,1)")
    g.add_argument("--norm-match", action="store_true", help="alpha is a fraction of each token's residual norm")
    g.add_argument("--alpha-unit", default="direction", choices=["direction", "raw"],
                   help="without --norm-match: alpha in units of the persona direction's norm, or raw")
    g.add_argument("--steer-layer", type=int, default=None, metavar="L",
                   help="steering layer for re-add and knockout (default: the sweep's strongest layer)")
    g.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="steering strength for re-add and knockout (default: the sweep's strongest alpha)")
    g.add_argument("--direction", default=None, metavar="FILE",
                   help="refusal direction to re-add (selection.json / .safetensors; default OUT/selection.json; "
                        "the re-add experiment is skipped when there is none)")
    g.add_argument("--n-random", type=_positive_int, default=2, metavar="N", help="random directions per control")
    g.add_argument("--generate", action="store_true",
                   help="also generate completions: classifier refusal and degeneration rates (slow)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens per completion")


# ===================================================================================== main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``refusal-fast``; returns the exit status (0 ok, 1 error, 2 usage error).

    The arguments are parsed once; ``--help`` / usage errors raise ``SystemExit`` from argparse as
    usual. Output paths are checked and ``--out`` is locked before any model is loaded.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # --help / bad usage exit here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_flush_denormal(True)
    try:
        with open_outputs(args):
            run_command(args, argv, Session(parse=parser.parse_args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if getattr(args, "debug", False):
            raise
        msg = str(exc).strip() or type(exc).__name__
        kind = "" if isinstance(exc, (CLIError, ValueError, TypeError, FileNotFoundError, ModuleNotFoundError)) \
            else f"{type(exc).__name__}: "
        print(f"{PROG} {args.command}: error: {kind}{msg}", file=sys.stderr)
        if not isinstance(exc, CLIError):
            print("(rerun with --debug for the full traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
