"""The README and docs/ stay short, correct and self-contained.

* the README is a five-minute read (at most 150 lines) with one replaceable results block;
* every relative link in README.md and docs/*.md points to a file that exists, and every ``#anchor``
  to a heading of that file (GitHub's heading slugs);
* every repository path named in backticks exists (paths the pipeline writes into a run folder are
  the short, explicit exception below);
* nothing in the product cites notes that are not part of it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A backticked token is taken for a repository path when it starts with one of these folders or is
# one of these top-level files.
REPO_DIRS = ("notebooks/", "realign_lib/", "configs/", "scripts/", "tests/", "benchmarks/", "experiments/",
             "docs/", "data/", ".ci/")
TOP_FILES = {"README.md", "pyproject.toml", "requirements.txt", "environment.yml"}

# Paths named in the docs that are written by the kit, not shipped with it. Keep this list short: each
# entry says what writes it.
GENERATED = {
    "runs/": "every run folder (realign run, the notebooks)",
    "data/samples.jsonl": "stage 00, inside a run folder (<run_dir>/data/samples.jsonl)",
    "data/tiny_world/": "notebook 00_tiny_world, inside a run folder (<run_dir>/data/tiny_world/)",
    "benchmarks/results/gpu_check.json": "benchmarks/gpu_check.py on a GPU machine (not committed until one runs it)",
}
PLACEHOLDER = re.compile(r"[<*{\[]")

FORBIDDEN = re.compile(r"design[ _-]notes|design\.md|\.\./shared", re.IGNORECASE)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks (their lines become empty, so line numbers stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link and code markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: … are not checked


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    return bad


def backticked_paths(path: Path) -> list[str]:
    """Tokens of inline code spans that look like repository paths (or ``realign_lib.<module>``)."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", _prose(path.read_text(encoding="utf-8"))):
        for token in span.split():
            token = token.split("=")[-1].strip("\"'(),;:")
            token = token.split("#")[0].rstrip(".")
            if token and (token.startswith(REPO_DIRS + ("runs/",)) or token in TOP_FILES
                          or token.startswith("realign_lib.")):
                out.append(token)
    return out


def missing_paths(path: Path) -> list[str]:
    bad = []
    for token in backticked_paths(path):
        if PLACEHOLDER.search(token) or any(token == g or (g.endswith("/") and token.startswith(g))
                                            for g in GENERATED):
            continue
        if token.startswith("realign_lib."):
            parts, here, i = token.split(".")[1:], ROOT / "realign_lib", 0
            while i < len(parts) and (here / parts[i]).is_dir():  # packages
                here, i = here / parts[i], i + 1
            if i < len(parts) and (here / f"{parts[i]}.py").is_file():  # a module
                i += 1
            if i == 0 or i < len(parts) - 1:  # one name after the module at most (a function, a class)
                bad.append(f"{token}: no module realign_lib/{'/'.join(parts[:max(i, 1)])}.py")
        elif not (ROOT / token).exists():
            bad.append(f"{token}: not in the repository")
    return bad


# --------------------------------------------------------------------------------------------- tests
def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 150, f"README.md has {n} lines; keep it to 150 and move detail into docs/"


def test_readme_has_one_replaceable_results_block():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("<!-- results:begin -->") == 1 and text.count("<!-- results:end -->") == 1
    block = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert {r.split("|")[1].strip() for r in rows} >= {"base", "DPO", "rDPO"}, "the results table lost a row"


def test_results_in_readme_and_docs_are_written_from_the_committed_results(tmp_path):
    """The README's results block and docs/results.md's tables equal what scripts/write_results.py writes
    from experiments/results/comparison.json and benchmarks/results/stage00_worlds.json; and the check
    notices a hand edit."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "scripts/write_results.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import write_results
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    edited = readme.replace(block, block.replace("| rDPO |", "| rDPO (typed) |"))
    assert edited != readme
    assert write_results.replace_block(edited, "results", block) == readme  # the writer restores it
    with pytest.raises(ValueError, match="exactly once"):
        write_results.replace_block("no markers", "results", "x")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_repository_paths_exist(doc):
    assert missing_paths(doc) == []


def test_the_checks_can_fail(tmp_path):
    """The checkers are not vacuous: a broken link, a bad anchor and a missing path are all caught,
    and links and paths inside fenced code are not checked."""
    (tmp_path / "gpu.md").write_text((ROOT / "docs" / "gpu.md").read_text(encoding="utf-8"), encoding="utf-8")
    doc = tmp_path / "probe.md"
    doc.write_text("# A page\n\n[ok](gpu.md#install) [gone](no_such_page.md) [bad](gpu.md#no-such-heading)\n"
                   "[self](#a-page) [web](https://example.org/x.md) `configs/no_such.yaml` `configs/paper.yaml`\n"
                   "`realign_lib.no_such_module` `realign_lib.training.losses` `runs/x/y.json` `configs/backbones/<name>.yaml`\n"
                   "```\n[in code](ignored.md) `configs/ignored.yaml`\n```\n", encoding="utf-8")
    bad = broken_links(doc)
    assert len(bad) == 2 and bad[0].startswith("no_such_page.md: no file"), bad
    assert bad[1] == "gpu.md#no-such-heading: no heading with the anchor #no-such-heading in gpu.md"
    assert missing_paths(doc) == ["configs/no_such.yaml: not in the repository",
                                  "realign_lib.no_such_module: no module realign_lib/no_such_module.py"]


def test_github_slugs():
    assert github_slug("Check the machine first: `benchmarks/gpu_check.py`") == \
        "check-the-machine-first-benchmarksgpu_checkpy"
    assert github_slug("Two presets: `paper` and `release`") == "two-presets-paper-and-release"
    assert github_slug("The main command's own run") == "the-main-commands-own-run"
    assert github_slug("Strategic masking (stage 02)") == "strategic-masking-stage-02"


def _product_files():
    yield ROOT / "README.md"
    yield from (p for p in (ROOT / "docs").rglob("*") if p.is_file())
    yield from (ROOT / "realign_lib").glob("*.py")
    yield from (ROOT / "notebooks").glob("*.py")
    yield from (p for p in (ROOT / "configs").rglob("*") if p.is_file())
    yield from (p for p in (ROOT / "scripts").rglob("*") if p.is_file())


def test_no_citations_of_notes_outside_the_product():
    hits = []
    for p in _product_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a figure or other binary file
        for i, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert hits == [], "the product must stand alone; copy the fact instead of citing:\n" + "\n".join(hits)
