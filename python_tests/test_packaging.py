"""Project metadata: one version source, and requirements.txt agreeing with pyproject.toml's bounds."""
from __future__ import annotations

from importlib.metadata import requires, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import refusal_fast
from refusal_fast.means import library_version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements_txt() -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name not in out, f"requirements.txt lists {req.name} twice"
            out[name] = req
    return out


def _metadata_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    lines += pyproject["build-system"]["requires"]
    return [Requirement(x) for x in lines]


def test_version_has_one_source():
    """__version__, means.library_version() and the installed metadata report the same version."""
    assert _pyproject()["project"]["dynamic"] == ["version"]
    installed = version("refusal-fast")
    assert installed == refusal_fast.__version__ == library_version(), (
        f"installed metadata says {installed}, refusal_fast.__version__ is {refusal_fast.__version__}: "
        "re-run `make install` (or `pip install -e .`) after changing the version")


def test_installed_metadata_is_this_pyproject():
    """The installed package's dependencies are the ones pyproject.toml declares (an editable install of this tree)."""
    project = _pyproject()["project"]
    declared = {str(Requirement(x)) for x in project["dependencies"]}
    for extra, lines in project["optional-dependencies"].items():
        declared |= {str(Requirement(f'{x}; extra == "{extra}"')) for x in lines}
    assert {str(Requirement(x)) for x in requires("refusal-fast") or []} == declared


def _disagreements(metadata: list[Requirement], reqs: dict[str, Requirement]) -> list[str]:
    """Metadata requirements that requirements.txt lacks, or lists with other bounds (an exact pin inside
    the metadata's bounds agrees: torch's machine pin)."""
    problems = []
    for meta in metadata:
        pinned = reqs.get(canonicalize_name(meta.name))
        if pinned is None:
            problems.append(f"{meta.name}: in pyproject.toml but not in requirements.txt")
            continue
        if pinned.specifier == meta.specifier:
            continue
        specs = list(pinned.specifier)
        if len(specs) == 1 and specs[0].operator == "==" and meta.specifier.contains(specs[0].version,
                                                                                    prereleases=True):
            continue
        problems.append(f"{meta.name}: requirements.txt has '{pinned.specifier}', "
                        f"pyproject.toml has '{meta.specifier}'")
    return problems


def test_requirements_txt_agrees_with_metadata():
    """Every dependency, extra and build requirement of pyproject.toml is in requirements.txt with the same
    bounds, or pinned there to an exact version inside them."""
    problems = _disagreements(_metadata_requirements(_pyproject()), _requirements_txt())
    assert not problems, "requirements.txt and pyproject.toml disagree:\n" + "\n".join(problems)


def test_disagreements_are_found():
    """The check flags a drifted bound, a pin outside the bounds and a missing package; accepts a pin inside."""
    meta = [Requirement("numpy>=1.24"), Requirement("torch>=2.6"), Requirement("tqdm>=4.60")]
    reqs = {"numpy": Requirement("numpy>=1.20"), "torch": Requirement("torch==2.5.1")}
    problems = _disagreements(meta, reqs)
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["numpy", "torch", "tqdm"]
    assert _disagreements(meta, {**reqs, "numpy": Requirement("numpy>=1.24"), "torch": Requirement("torch==2.13.0"),
                                 "tqdm": Requirement("tqdm>=4.60")}) == []
