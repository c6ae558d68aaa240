"""MkDocs hooks: publish the repository files that documentation pages link to.

Pages under ``docs/`` link to tests, benchmark scripts and the demo with
relative links (``../tests/orm/test_queryset.py``), so the links work when the
Markdown is read in the repository. MkDocs only publishes what is inside
``docs/`` and, in strict mode, fails on a link that leaves it. These hooks copy
each linked file into the site under ``source/`` and point the link there; a
link to a file that does not exist is a warning, which fails ``--strict``.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repo_links")

#: Where the linked repository files are published inside the site.
PREFIX = "source"

# A Markdown link or image target that starts by leaving its directory.
_LINK = re.compile(r"(\]\()(\.\./[^)\s#]*)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")

_published: dict[str, str] = {}  # repository path -> site path


def _outside_target(page_uri: str, target: str) -> str | None:
    """Return the repository path ``target`` names if it leaves docs/, else None."""
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    if joined == "docs" or joined.startswith("docs/"):
        return None
    return joined


def on_files(files: Files, config: Any) -> Files:
    """Add every repository file linked from a page, warning about missing ones."""
    _published.clear()
    root = Path(config["config_file_path"]).resolve().parent
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for match in _LINK.finditer(text):
            repo_path = _outside_target(page.src_uri, match.group(2))
            if repo_path is None or repo_path in _published:
                continue
            source = root / repo_path
            if repo_path.startswith("../") or not source.is_file():
                log.warning(
                    "Doc file '%s' links to '%s', which is not a file of the repository.",
                    page.src_uri,
                    match.group(2),
                )
                continue
            site_path = f"{PREFIX}/{repo_path}"
            _published[repo_path] = site_path
            # Published, but neither in the nav nor reported as missing from it.
            files.append(
                File.generated(
                    config, site_path, abs_src_path=str(source), inclusion=InclusionLevel.NOT_IN_NAV
                )
            )
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links to repository files at their published copies."""

    def rewrite(match: re.Match[str]) -> str:
        repo_path = _outside_target(page.file.src_uri, match.group(2))
        if repo_path is None or repo_path not in _published:
            return match.group(0)
        page_dir = posixpath.dirname(page.file.src_uri) or "."
        target = posixpath.relpath(_published[repo_path], page_dir)
        return f"{match.group(1)}{target}{match.group(3) or ''}{match.group(4)}"

    return _LINK.sub(rewrite, markdown)
