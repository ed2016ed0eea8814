"""Write the architecture table of docs/architectures.md from the test suite's list (tiny_models.ARCH_SPECS).

    python scripts/architectures_table.py          # rewrite the table in docs/architectures.md
    python scripts/architectures_table.py --check  # exit 1 if the file is out of date (the test suite checks this)

Every row is one architecture that python_tests/test_architectures.py builds and checks, so the table
cannot claim what the tests do not show.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architectures.md"
BEGIN = "<!-- BEGIN GENERATED TABLE (scripts/architectures_table.py) -->"
END = "<!-- END GENERATED TABLE -->"


def _specs():
    sys.path.insert(0, str(ROOT / "python_tests"))
    from tiny_models import ARCH_SPECS, TEMPLATE_SOURCES

    return ARCH_SPECS, TEMPLATE_SOURCES


def render() -> str:
    """The markdown table (with its markers) for the current ARCH_SPECS."""
    specs, sources = _specs()
    rows = [
        "| `model_type` | config | chat template (style of) | extract | ablate | orthogonalize | export | structure |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in specs:
        structure = []
        if s.moe:
            structure.append(f"MoE: {s.moe}")
        if s.parallel:
            structure.append("parallel attention + MLP")
        if s.post_norms:
            structure.append("post-sub-layer norms")
        if s.scaled:
            structure.append("scaled embedding / residual")
        if s.tied:
            structure.append("tied embeddings")
        if s.biases:
            structure.append("output biases")
        if s.note:
            structure.append(s.note)
        orth = "= ablate" if s.orthogonalize == "exact" else "refused (norm after sub-layer)"
        export = "save_pretrained" if s.orthogonalize == "exact" else "—"
        rows.append(f"| `{s.arch}` | `{s.config_class}` | {sources[s.template]} | = float64 reference | exact "
                    f"| {orth} | {export} | {'; '.join(structure)} |")
    return "\n".join([BEGIN, *rows, END])


def updated(text: str) -> str:
    """``text`` with the part between the markers replaced by :func:`render`."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: table markers not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/architectures.md is out of date")
    args = ap.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python scripts/architectures_table.py")
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
