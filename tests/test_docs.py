"""The repository stands on its own: what it cites lives in it (issue #17).

- no tracked file cites the background documents kept outside the repository (ALGORITHMS.md,
  DESIGN.md, ``../shared``) or their source tags (``[FB]``, ``[SF]``, ``§3`` ...);
- every method config in ``configs/method/`` has its section in ``docs/methods.md``, headed by its
  ``id`` so that ``docs/methods.md#<id>`` links to it;
- every ``docs/methods.md#<anchor>`` cited anywhere resolves.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
METHODS_DOC = ROOT / "docs" / "methods.md"

OUTSIDE = re.compile(r"ALGORITHMS\.md|DESIGN\.md|\.\./shared\b|/work/shared\b")
# the source tags of those documents, and their section signs; only in our own text files, whose
# content is prose and code (corpora and experts under data/ may contain anything)
TAGS = re.compile(r"\[(?:AM|SF|FB|EM|FW|WUDI|N-EM|N-FW)\]|§\s?\d")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}
CITED = re.compile(r"(?<![\w/])(?:docs/)?methods\.md#([\w\-]+)")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.decode().split("\0") if p and p != THIS and (ROOT / p).is_file()]


def read_text(path: str) -> str:
    return (ROOT / path).read_bytes().decode("utf-8", errors="ignore")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``_`` and ``-`` kept), spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> dict[str, str]:
    """{anchor: heading text} for every heading outside code fences, duplicates numbered as GitHub does."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out[base if n == 0 else f"{base}-{n}"] = m.group(1)
    for m in re.finditer(r'<a\s+(?:id|name)="([^"]+)"', markdown):  # explicit anchors
        out.setdefault(m.group(1), m.group(1))
    return out


def test_no_file_cites_documents_outside_the_repository():
    bad = []
    for path in tracked_files():
        text = read_text(path)
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) or (Path(path).suffix in TEXT_SUFFIXES and TAGS.search(line)):
                bad.append(f"{path}:{i}: {line.strip()[:120]}")
    assert not bad, ("these lines cite documents outside the repository (cite the paper and/or "
                     "docs/methods.md#<id> instead):\n" + "\n".join(bad))


def test_every_method_config_has_a_section_in_docs_methods():
    assert METHODS_DOC.is_file(), "docs/methods.md is missing"
    found = anchors(METHODS_DOC.read_text())
    configs = sorted((ROOT / "configs" / "method").glob("*.yaml"))
    assert configs
    missing = []
    for cfg in configs:
        method_id = (yaml.safe_load(cfg.read_text()) or {}).get("id")
        assert method_id, f"{cfg.name} has no id"
        if method_id not in found:
            missing.append(f"{cfg.name} (id {method_id})")
    assert not missing, ("method configs without a section in docs/methods.md (add a heading "
                         "'### <id>'):\n" + "\n".join(missing))


def test_cited_method_anchors_exist():
    found = anchors(METHODS_DOC.read_text())
    bad = []
    for path in dict.fromkeys(tracked_files() + ["docs/methods.md", "docs/architecture.md"]):
        if not (ROOT / path).is_file():
            continue
        for i, line in enumerate(read_text(path).splitlines(), 1):
            cited = CITED.findall(line)
            if path == "docs/methods.md":  # its own links: (#anchor)
                cited += re.findall(r"\]\(#([\w\-]+)\)", line)
            bad += [f"{path}:{i}: #{a}" for a in cited if a not in found]
    assert not bad, "links to sections that docs/methods.md does not have:\n" + "\n".join(sorted(set(bad)))


def test_every_module_outside_methods_is_named_in_docs_architecture():
    """docs/architecture.md is the map of the package: a module it does not name is one a newcomer cannot place
    (methods are one file each behind the registry, and each has its section in docs/methods.md)."""
    text = read_text("docs/architecture.md")
    unnamed = [p for p in tracked_files() if p.startswith("adamerge/") and p.endswith(".py")
               and not p.startswith(("adamerge/methods/", "adamerge/data/"))  # data/: the recipe, data/README.md and Path(p).name != "__init__.py"
               and not re.search(rf"\b{Path(p).stem}\b", text)]
    assert not unnamed, f"name these in docs/architecture.md: {unnamed}"


def test_readme_reads_in_five_minutes():
    """About 150 lines, no table cell over 30 words: the details live in docs/."""
    lines = read_text("README.md").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move details to docs/"
    long_cells = [f"README.md:{i}" for i, line in enumerate(lines, 1) if line.startswith("|")
                  for cell in line.strip("|").split("|") if len(cell.split()) > 30]
    assert not long_cells, long_cells


def test_relative_links_in_the_docs_resolve():
    bad = []
    for path in ["README.md", *sorted(p for p in tracked_files() if p.startswith("docs/") and p.endswith(".md"))]:
        for i, line in enumerate(read_text(path).splitlines(), 1):
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", line):
                if "://" not in target and not (ROOT / path).parent.joinpath(target).exists():
                    bad.append(f"{path}:{i}: {target}")
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)
