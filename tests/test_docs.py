"""The documentation: the site builds with no broken link, and the README's links lead somewhere.

`mkdocs build --strict` checks every link and anchor between the pages of docs/ and that
every page is in mkdocs.yml's nav; it never reads README.md, whose links (relative, so they
work on GitHub too) are checked here against the files and their headings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[1]

# [text](target) and ![alt](target), the target up to the first space or closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(markdown_file: Path) -> set[str]:
    """The anchors the site gives the file's headings (mkdocs' toc slugs; GitHub's agree for ours)."""
    text = _FENCE.sub("", markdown_file.read_text())
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def broken_links(markdown_file: Path, root: Path = REPO) -> list[str]:
    """Relative links of ``markdown_file`` whose file, or heading anchor, does not exist."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", markdown_file.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (markdown_file.parent / path) if path else markdown_file
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved.relative_to(root) if resolved.is_relative_to(root) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path or markdown_file.name}")
    return broken


def test_site_builds_strict_with_every_page(tmp_path):
    """A broken link or anchor between pages, or a page missing from the nav, fails the build."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    pages = sorted(p.stem for p in (REPO / "docs").glob("*.md"))
    assert {"index", "method", "update-loop", "tracking", "prefect", "team-stack", "benchmarks",
            "configuration", "architecture"} <= set(pages)
    built = [p for p in pages if (site / ("index.html" if p == "index" else f"{p}/index.html")).is_file()]
    assert built == pages
    # The screenshots the pages show travel with the site; the scripts that take them do not.
    assert sorted(p.name for p in site.glob("*.png")) == sorted(p.name for p in (REPO / "docs").glob("*.png"))
    assert not list(site.rglob("*.py"))


def test_readme_links_lead_to_existing_files_and_headings():
    assert broken_links(REPO / "README.md") == []
    # The README points at the documentation rather than holding it.
    linked = {t.partition("#")[0] for t in _LINK.findall((REPO / "README.md").read_text())}
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= linked


def test_broken_links_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    """The README check itself: a link to a missing page or heading is reported, a good one is not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The head's optimiser, a first sweep\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#the-heads-optimiser-a-first-sweep) [web](https://example.org/x)\n"
        "[gone](docs/gone.md) [no heading](docs/page.md#no-such-heading)\n"
        "```\n[in a code block](docs/ignored.md)\n```\n"
    )
    assert broken_links(readme, root=tmp_path) == [
        "docs/gone.md: no file docs/gone.md",
        "docs/page.md#no-such-heading: no heading with anchor #no-such-heading in docs/page.md",
    ]
