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
