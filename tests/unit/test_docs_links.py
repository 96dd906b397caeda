"""Every relative link and #anchor in the README and docs/ resolves inside the repository.

Anchors are GitHub's heading ids: the heading's text in lower case, markup and punctuation
dropped (letters, digits, `_`, `-` and spaces kept), spaces turned into `-`, and a repeated id
numbered `-1`, `-2`… Code blocks and code spans are not read: their brackets are not links."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:…


@dataclass(frozen=True)
class DeadLink:
    source: str
    target: str
    why: str


def _prose(text: str) -> str:
    """The text without code blocks and code spans (line breaks kept for line numbers)."""
    without_blocks = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub("code", without_blocks)


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: Counter[str] = Counter()
    found = set()
    for match in HEADING.finditer(text):
        base = slug(match.group(2))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def markdown_files(root: Path) -> list[Path]:
    return sorted([root / "README.md", *(root / "docs").rglob("*.md")])


def dead_links(root: Path) -> list[DeadLink]:
    dead = []
    for source in markdown_files(root):
        prose = _prose(source.read_text())
        targets = [m.group(1) for m in INLINE_LINK.finditer(prose)] + REFERENCE_LINK.findall(prose)
        name = str(source.relative_to(root))
        for target in targets:
            if EXTERNAL.match(target):
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (source.parent / unquote(path_part)).resolve() if path_part else source
            if not resolved.is_relative_to(root.resolve()):
                dead.append(DeadLink(name, target, "outside the repository"))
            elif not resolved.exists():
                dead.append(DeadLink(name, target, "no such file"))
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                dead.append(DeadLink(name, target, f"no heading #{anchor} in {resolved.name}"))
    return dead


TEST_REFERENCE = re.compile(r"`(?=tests/|::)(tests/[\w/]+\.py)?(?:::(\w+))?`")


def dead_test_references(path: Path, root: Path) -> list[str]:
    """`tests/x.py::name` (or `::name`, of the file named last) cited in a page: each must exist."""
    dead, current = [], ""
    for match in TEST_REFERENCE.finditer(path.read_text()):
        module, name = match.groups()
        current = module or current
        source = root / current
        defined = source.is_file() and (
            not name or re.search(rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE) is not None
        )
        if not defined:
            dead.append(match.group(0))
    return dead


def test_the_dify_contract_cites_tests_that_exist() -> None:
    assert len(TEST_REFERENCE.findall((REPO / "docs" / "dify.md").read_text())) >= 13
    assert dead_test_references(REPO / "docs" / "dify.md", REPO) == []


def test_a_cited_test_that_is_gone_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    cited = "`tests/unit/test_docs_links.py::test_heading_ids_follow_github`, `::no_such_test`, `tests/gone.py`"
    page.write_text(cited)
    assert dead_test_references(page, REPO) == ["`::no_such_test`", "`tests/gone.py`"]


CODE_PATH = re.compile(r"(?<![\w/.])((?:services|tests|benchmarks|deploy/kubernetes|compose|protos)/[\w./-]*[\w/])")
# What the project writes when it runs (git ignores them): named in the docs, absent in a clone.
WRITTEN_WHEN_RUN = ("benchmarks/results/",)


def dead_code_paths(root: Path) -> list[str]:
    """Paths into the repository's code the pages name (`services/edge_http/core/runs.py`, in prose
    or in code spans): each must exist."""
    dead = []
    for source in markdown_files(root):
        for match in CODE_PATH.finditer(FENCE.sub("", source.read_text())):
            path = match.group(1).rstrip(".")
            if not (root / path).exists() and path not in WRITTEN_WHEN_RUN:
                dead.append(f"{source.relative_to(root)}: {path}")
    return dead


def test_every_code_path_the_docs_name_exists() -> None:
    assert dead_code_paths(REPO) == []


def test_a_moved_module_named_in_the_docs_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "here.py").touch()
    (tmp_path / "README.md").write_text("See `services/here.py` and services/gone.py.\n")
    assert dead_code_paths(tmp_path) == ["README.md: services/gone.py"]


def test_every_relative_link_and_anchor_resolves() -> None:
    assert dead_links(REPO) == []


def test_the_docs_link_to_each_other() -> None:
    """The check reads real links: the README's links into docs/ are among what it resolves."""
    prose = _prose((REPO / "README.md").read_text())
    assert sum(1 for m in INLINE_LINK.finditer(prose) if m.group(1).startswith("docs/")) >= 5


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    baseline = set(dead_links(tmp_path))  # the copy lacks the code and deploy files some links name
    readme = tmp_path / "README.md"
    readme.write_text(
        readme.read_text()
        + "\n[gone](docs/no-such-page.md) [moved](docs/api.md#no-such-heading) [up](../../etc/passwd)"
        + " `[in code](docs/ignored.md)`\n"
    )
    assert set(dead_links(tmp_path)) - baseline == {
        DeadLink("README.md", "docs/no-such-page.md", "no such file"),
        DeadLink("README.md", "docs/api.md#no-such-heading", "no heading #no-such-heading in api.md"),
        DeadLink("README.md", "../../etc/passwd", "outside the repository"),
    }


def test_heading_ids_follow_github() -> None:
    assert slug("When something fails") == "when-something-fails"
    assert slug("The inference engine: continuous batching over paged KV") == (
        "the-inference-engine-continuous-batching-over-paged-kv"
    )
    assert slug("`sluice up` and [Envoy](x.md)") == "sluice-up-and-envoy"
    assert slug("Security: keys, limits, identities") == "security-keys-limits-identities"
