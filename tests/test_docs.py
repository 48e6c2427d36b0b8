"""The documentation holds together in a fresh clone: links and anchors resolve, file paths it names exist, the
README stays short, and nothing outside tests/ points at notes that live outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
README_LIMIT_BYTES = 13_000
OUTSIDE_NOTES = ("../shared", "ALGORITHMS.md", "DESIGN.md", "VERIFIERS.md", "STYLE.md")

_FENCE_RE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
_LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_HTML_ANCHOR_RE = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _prose(text: str) -> str:
    """The markdown without fenced code blocks (links and headings there are not links and headings)."""
    return _FENCE_RE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation except `-` and `_` removed,
    spaces to hyphens. E.g. `REINFORCE++` -> `reinforce`, `Dr. GRPO` -> `dr-grpo`, `` `hf` and `vllm` `` ->
    `hf-and-vllm`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every anchor a markdown file defines: heading slugs (repeats get -1, -2, ...) and explicit `<a id=...>`."""
    text = _prose(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set(_HTML_ANCHOR_RE.findall(text))
    for heading in _HEADING_RE.findall(text):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def test_github_slug_follows_githubs_rules():
    assert github_slug("REINFORCE++") == "reinforce"
    assert github_slug("Dr. GRPO") == "dr-grpo"
    assert github_slug("Rollout engines: `hf` and `vllm`") == "rollout-engines-hf-and-vllm"
    assert github_slug("One GPU for both: engines sleep while the learner trains") == (
        "one-gpu-for-both-engines-sleep-while-the-learner-trains"
    )
    assert github_slug("Sharded learners (FSDP)") == "sharded-learners-fsdp"
    assert github_slug("rollout_engines and [a link](x.md)") == "rollout_engines-and-a-link"


def test_anchors_number_repeated_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('# Title\n## Notes\n```\n## not a heading\n```\n## Notes\n<a id="custom"></a>\n')
    assert anchors_of(page) == {"title", "notes", "notes-1", "custom"}


def _link_problems(doc: Path) -> list[str]:
    problems = []
    for target in _LINK_RE.findall(_prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here (no network)
            continue
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        if ROOT not in linked.parents and linked != ROOT:
            problems.append(f"{doc.name}: {target} points outside the repository")
        elif not linked.exists():
            problems.append(f"{doc.name}: {target} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            problems.append(f"{doc.name}: {target}: no heading in {linked.name} has the anchor #{anchor}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = [problem for doc in DOC_FILES for problem in _link_problems(doc)]
    assert not problems, "\n".join(problems)


def test_every_repository_path_named_in_the_docs_exists():
    # `learner/fsdp.py`, `tests/verifiers/adversarial/`: a code span that starts with one of the repository's
    # top-level folders and ends in a file suffix or `/` is a path that must exist (a pytest node id may follow
    # `::`); metric names such as `rewards/margin` have neither. Catches docs left behind by a move.
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    problems = []
    for doc in DOC_FILES:
        for span in _CODE_SPAN_RE.findall(_prose(doc.read_text(encoding="utf-8"))):
            candidate = span.split("::")[0]
            if re.fullmatch(r"[\w.-]+/[\w./-]*(\.[a-z]+|/)", candidate) and candidate.split("/")[0] in top:
                if not (ROOT / candidate).exists():
                    problems.append(f"{doc.name}: `{span}` does not exist")
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes; move depth into docs/ (limit {README_LIMIT_BYTES})"


def test_readme_lists_every_recipe():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "recipes").glob("*.yaml")) if f"`{p.name}`" not in readme]
    assert not missing, f"recipes missing from README.md's recipes table: {missing}"


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.splitlines()]


def test_nothing_outside_tests_points_at_notes_outside_the_repository():
    problems = []
    for path in _tracked_files():
        if path.relative_to(ROOT).parts[0] == "tests" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), start=1):
            for name in OUTSIDE_NOTES:
                if name in line:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: mentions {name}")
    assert not problems, "point these at docs/ instead:\n" + "\n".join(problems)


def test_docs_pages_named_in_the_code_exist_with_their_anchors():
    # docstrings point readers at `docs/algorithms.md#ppo`; a renamed heading must not leave them dangling
    pattern = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
    problems = []
    for path in _tracked_files():
        if path.suffix != ".py" or path.name == "test_docs.py":
            continue
        for page, anchor in pattern.findall(path.read_text(encoding="utf-8")):
            target = ROOT / "docs" / page
            if not target.exists():
                problems.append(f"{path.relative_to(ROOT)}: docs/{page} does not exist")
            elif anchor and anchor not in anchors_of(target):
                problems.append(f"{path.relative_to(ROOT)}: docs/{page} has no anchor #{anchor}")
    assert not problems, "\n".join(problems)
