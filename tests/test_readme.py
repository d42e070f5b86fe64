"""README stands alone: every relative link and every repository path it names exists inside the
clone; nothing points outside it (web links are fine)."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Paths into the tracked tree (data/ and outputs/ are filled at run time: only their top folder is checked).
REPO_PATH = re.compile(r"(?<![\w./$-])((?:conf|src|scripts|tests|docs)/[\w./<>{}*,-]*|Makefile|pyproject\.toml)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve_inside_the_repository():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    links = LINK.findall(README)
    assert links, "the README has links (the paper, docs/design.md)"
    for target in links:
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"no heading for #{anchor}"
            continue
        resolved = (REPO_ROOT / path).resolve()
        assert resolved.is_relative_to(REPO_ROOT.resolve()), f"{target} points outside the repository"
        assert resolved.exists(), f"{target} does not exist in the repository"


def test_no_path_outside_the_repository_and_named_repo_paths_exist():
    without_web_links = re.sub(r"https?://\S+", "", README)
    assert "../" not in without_web_links, "README names a path outside the repository"
    assert "shared/DESIGN" not in README and "shared/paper" not in README
    checked = 0
    for raw in set(REPO_PATH.findall(without_web_links)):
        path = re.split(r"[<{*]", raw, maxsplit=1)[0].rstrip(".,")
        if raw != path:  # a placeholder: the folder before it must exist
            path = path.rsplit("/", 1)[0] if "/" in path else path
        assert (REPO_ROOT / path).exists(), f"README names {raw}, but {path} is not in the repository"
        checked += 1
    assert checked > 20  # the scan sees the entry points, configs, scripts ...
    assert (REPO_ROOT / "outputs").is_dir() and (REPO_ROOT / "data" / "README.md").is_file()


def test_the_paper_is_cited_by_title_and_link():
    assert "Decoupling Object Attributes for Enhanced Editability in Customized Image Inpainting" in README
    assert "https://arxiv.org/abs/2411.17223" in README
