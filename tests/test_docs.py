"""The docs stand on their own: they cite only files of this repository, and nothing cites
the specification the project was built from (users do not have it)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SOURCES = sorted(p for d in ("trasmuon", "trasmuon_kernels", "bench", "tests")
                 for p in (REPO / d).rglob("*.py") if p.name != Path(__file__).name)

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# The specification's file name, its "shared/" folder and the ways prose referred to it; the
# [P] keeps this file itself from spelling the name.
UNSHIPPED = re.compile(r"S[P]EC(?:\.md|'s| step)|\(S[P]EC|shared/")
# `path/to/file.ext` in backticks, optionally with ::test or :line after it.
CODE_PATH = re.compile(r"`((?:[\w.\-]+/)+[\w.\-*]+\.(?:py|md|json|png|sh|toml|txt))(?:::\w+|:\d+)?`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_pages_cite_only_files_of_the_repository(page):
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    for target in CODE_PATH.findall(text):
        if "*" in target or target.startswith(("out/", "$OUT/")):
            continue  # a glob, or a file a command writes outside the tracked tree
        if not ((REPO / target).exists() or (page.parent / target).exists()):
            missing.append(target)
    assert not missing, f"{page.name} cites files that are not in the repository: {missing}"


@pytest.mark.parametrize("path", [*PAGES, *SOURCES], ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_cites_the_unshipped_specification(path):
    text = path.read_text()
    found = UNSHIPPED.search(text)
    assert found is None, f"{path.relative_to(REPO)} cites {found.group()!r}"


# --------------------------------------------------------------------------------------
# Quoted symbols: `module.name` (and `module.Class.attr`) in backticks, where ``module`` is a
# module of the repository named by its dotted path (`trasmuon.reference.newton_schulz`) or by
# its last component when that names one module (`reference.newton_schulz`), must exist. Read
# from the sources' syntax trees (no imports, so no import-time side effects).
# --------------------------------------------------------------------------------------
import ast  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402

SYMBOL = re.compile(r"`((?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*)(?:\([^`]*\))?`")
PACKAGES = ("trasmuon", "trasmuon_kernels", "bench")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages; plus each last component that
    names only one module."""
    full = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            full[name] = path
    short: dict[str, list[Path]] = {}
    for name, path in full.items():
        short.setdefault(name.rsplit(".", 1)[-1], []).append(path)
    out = dict(full)
    for name, paths in short.items():
        if len(paths) == 1 and name not in out:
            out[name] = paths[0]
    return out


MODULES = _modules()


def _names(body) -> dict[str, ast.AST | None]:
    """What a module or class body defines: functions, classes, assignments, imports."""
    names: dict[str, ast.AST | None] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names[t.id] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
        elif isinstance(node, (ast.If, ast.Try)):  # definitions under a version check
            for part in (node.body, getattr(node, "orelse", []), *(h.body for h in getattr(node, "handlers", []))):
                names.update(_names(part))
    return names


FILE_SUFFIXES = ("py", "md", "json", "sh", "toml", "txt", "png")


def _instance_base(name: str):
    """Short names that docs also use for instances of torch classes (``optimizer.step``)."""
    import torch

    return {"optimizer": torch.optim.Optimizer, "graph": torch.cuda.CUDAGraph}.get(name)


def _resolves(symbol: str) -> bool | None:
    """Whether ``symbol`` exists; None when it does not start with a module of ours (or is
    a file name)."""
    parts = symbol.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return None
    for split in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:split])
        if module in MODULES:
            break
    else:
        return None
    rest = parts[split:]
    path = MODULES[module]
    if rest[0] in MODULES and MODULES[rest[0]].parent == path.parent:  # a submodule
        return True
    tree = ast.parse(path.read_text())
    names = _names(tree.body)
    node = names.get(rest[0], False)
    if node is False and "." not in module:  # `plan.begin`: a method of an instance
        base = _instance_base(module)
        if base is not None and (hasattr(base, rest[0]) or re.search(rf"self\.{rest[0]}\s*[:=]", inspect.getsource(base))):
            return True
        return any(
            rest[0] in _names(c.body) for c in tree.body if isinstance(c, ast.ClassDef))
    if node is False:
        return False
    if len(rest) > 1 and isinstance(node, ast.ClassDef):
        return rest[1] in _names(node.body) or any(  # an attribute set in a method
            isinstance(t, ast.Attribute) and t.attr == rest[1]
            for t in ast.walk(node))
    return True


def test_symbol_resolution():
    assert _resolves("trasmuon.reference.newton_schulz") and _resolves("reference.newton_schulz")
    assert _resolves("trasmuon.DistributedTrasMuon") and _resolves("trasmuon.NoSuchOptimizer") is False
    assert _resolves("reference.no_such_function") is False
    assert _resolves("_launch.Launch.record") and _resolves("_launch.Launch.no_such") is False
    assert _resolves("optimizer.py") is None and _resolves("numpy.linalg") is None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_quoted_symbols_exist(page):
    missing = [s for s in SYMBOL.findall(page.read_text()) if _resolves(s) is False]
    assert not missing, f"{page.name} quotes names the code does not define: {missing}"


# --------------------------------------------------------------------------------------
# Quoted figures: a number followed by ``<!-- figure: PATH:KEY -->`` is the value at KEY of
# the JSON file PATH (bench/results), rounded as written. KEY is a dotted path; a list
# element is picked by index or by ``[field=value]``.
# --------------------------------------------------------------------------------------
FIGURE = re.compile(r"(-?\d+(?:\.\d+)?)[^\d<|]{0,12}<!-- figure: ([^\s:]+\.json):(\S+) -->")
KEY_PART = re.compile(r"([^.\[\]]+)|\[(\w+)=([^\]]+)\]")


def _lookup(data, key: str):
    for name, field, value in KEY_PART.findall(key):
        if field:
            matches = [row for row in data if str(row.get(field)) == value]
            assert len(matches) == 1, f"{len(matches)} rows with {field}={value}"
            data = matches[0]
        elif isinstance(data, list):
            data = data[int(name)]
        else:
            data = data[name]
    return data


def test_figure_markers_are_parsed():
    text = "| 0.265 <!-- figure: a.json:rules.x[impl=y].ms --> | 12 ms <!-- figure: b.json:n -->"
    assert FIGURE.findall(text) == [("0.265", "a.json", "rules.x[impl=y].ms"), ("12", "b.json", "n")]
    assert _lookup({"rules": {"x": [{"impl": "y", "ms": 1.5}, {"impl": "z"}]}}, "rules.x[impl=y].ms") == 1.5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_quoted_figures_match_the_results(page):
    wrong = []
    for written, path, key in FIGURE.findall(page.read_text()):
        value = _lookup(json.loads((REPO / path).read_text()), key)
        decimals = len(written.split(".")[1]) if "." in written else 0
        if f"{float(value):.{decimals}f}" != written:
            wrong.append(f"{written} for {path}:{key}, which is {value}")
    assert not wrong, f"{page.name} quotes figures the results do not hold: {wrong}"


def test_results_pages_quote_their_figures():
    # The pages that report measurements tie at least some of their figures to the JSON.
    for name in ("benchmarks.md",):
        assert FIGURE.search((REPO / "docs" / name).read_text()), f"{name} has no figure markers"


# --------------------------------------------------------------------------------------
# Reference and results. docs/README.md lists every page of docs/ once, under "Reference"
# (what the code does) or "Results" (what was measured, with command, machine and date). A
# reference page states no result: it holds no figure marker, and none of these signs of a
# measurement, each a phrase that opens or dates a result and is not how a page describes
# code:
#   - "Run on", "Ran on", "Measured on", "Timed on", "Counted on", capitalized: the opening of
#     a result's machine and date (lowercase "runs on the CPU" describes code and is allowed);
#   - "(measured" and "measured worst": a measured figure set beside a documented bound;
#   - an ISO date (2026-12-01): results are dated, reference pages are not.
# A reference page links to the results page instead.
# --------------------------------------------------------------------------------------
INDEX = REPO / "docs" / "README.md"
RESULT_STATEMENT = re.compile(
    r"\b(?:Run|Ran|Measured|Timed|Counted) on\b|\(measured\b|\bmeasured worst\b|\b20\d\d-[01]\d-[0-3]\d\b")
INDEX_ENTRY = re.compile(r"^\s*[-*] \[[^\]]+\]\(([\w.\-]+\.md)\)", re.M)


def _index() -> dict[str, list[str]]:
    """The pages each list of docs/README.md names, keyed by the list's heading."""
    lists: dict[str, list[str]] = {}
    for section in re.split(r"^## ", INDEX.read_text(), flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        lists[heading.strip()] = INDEX_ENTRY.findall(body)
    return lists


def test_result_statements_are_recognised():
    for text in ("Run on 2026-12-06 on the VM", "within 8 ulp (measured 4)", "Measured on gloo",
                 "(measured worst 1.9e-8)", "torch 2.13, 2026-12-02"):
        assert RESULT_STATEMENT.search(text), text
    for text in ("the tests run on the CPU", "it has not run on one", "what the script measures",
                 "16 launches for 5 steps", "a rate of 790-799 TFLOP/s"):
        assert not RESULT_STATEMENT.search(text), text


def test_the_index_lists_every_page_once():
    lists = _index()
    assert set(lists) == {"Reference", "Results"}, lists.keys()
    listed = [page for pages in lists.values() for page in pages]
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md") if p != INDEX)
    assert sorted(listed) == pages, (
        f"listed twice: {sorted({p for p in listed if listed.count(p) > 1})}; "
        f"not listed: {sorted(set(pages) - set(listed))}; not a page: {sorted(set(listed) - set(pages))}")


@pytest.mark.parametrize("name", _index().get("Reference", []))
def test_reference_pages_state_no_results(name):
    text = (REPO / "docs" / name).read_text()
    markers = FIGURE.findall(text)
    assert not markers, f"{name} quotes measured figures; move them to a results page: {markers}"
    found = [(text.count("\n", 0, m.start()) + 1, m.group()) for m in RESULT_STATEMENT.finditer(text)]
    assert not found, f"{name} states results (line, phrase); move them to a results page: {found}"
