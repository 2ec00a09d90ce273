"""Notebooks stored with the outputs of a reference run, and how to tell when those outputs are stale.

The repository's ``notebooks/NN_*.ipynb`` show what a run of the main command produced (figures, tables,
example pairs), so a reader sees each step without running anything. Their py:percent twins stay the
reviewable source. Each stored notebook records :func:`source_digest` of its cells in
``metadata.realign.source_sha256``; when a cell's source changes (an edit of the ``.py`` synced with
jupytext), the digest no longer matches and a test says to regenerate the outputs with
``python scripts/store_notebook_outputs.py``.

Outputs are copied from the executed copy in the run folder (``<run>/<stage>/<stage>.ipynb``) cell by
cell, papermill's injected-parameters cell dropped, and every machine path rewritten (the run folder to
its path relative to the repository, the repository root to nothing).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from realign_lib.cache import digest

__all__ = ["source_digest", "with_outputs", "machine_paths", "figure_cells", "MACHINE_PATH"]

# an absolute path on some machine: /tmp/..., /home/u/..., /work/..., C:\..., /content/ (Colab)
MACHINE_PATH = re.compile(r"(?<![\w.~-])(?:/(?:tmp|home|root|work|Users|usr|opt|var|mnt|content|private|srv)/"
                          r"|[A-Za-z]:\\\\)")


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return s if isinstance(s, str) else "".join(s)


def source_digest(nb: dict) -> str:
    """sha256 (16 hex digits) of the notebook's cell types and sources — not its outputs or metadata, so
    storing new outputs does not change it and editing any cell does."""
    cells = [[c["cell_type"], _source(c)] for c in nb["cells"]]
    return digest(cells)


def _scrub(value, replacements: list[tuple[str, str]]):
    if isinstance(value, str):
        for old, new in replacements:
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_scrub(v, replacements) for v in value]
    if isinstance(value, dict):
        return {k: (v if k in ("image/png", "image/jpeg") else _scrub(v, replacements)) for k, v in value.items()}
    return value


def with_outputs(source: dict, executed: dict, replacements: dict[str, str], outputs_from: str) -> dict:
    """``source`` (the repository's notebook) with the outputs of ``executed`` (papermill's copy of it).

    Cells are matched in order by type and source; papermill's ``injected-parameters`` cell is skipped.
    ``replacements``: ``machine path → what to write instead``, applied longest first to every text
    output (images untouched). Raises ValueError if the executed notebook was made from other sources."""
    cells = [c for c in executed["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    if [(c["cell_type"], _source(c)) for c in cells] != [(c["cell_type"], _source(c)) for c in source["cells"]]:
        raise ValueError(f"{outputs_from} was executed from other notebook sources: run the main command again")
    order = sorted(replacements.items(), key=lambda kv: -len(kv[0]))
    out = copy.deepcopy(source)
    for cell, done in zip(out["cells"], cells):
        if cell["cell_type"] == "code":
            cell["outputs"] = [_scrub(o, order) for o in done.get("outputs", [])]
            cell["execution_count"] = done.get("execution_count")
    out["metadata"].pop("papermill", None)
    out["metadata"]["realign"] = {"source_sha256": source_digest(source), "outputs_from": outputs_from}
    return out


def machine_paths(nb: dict) -> list[str]:
    """Text outputs that still name an absolute path of some machine (each as a short excerpt)."""
    found = []
    for c in nb["cells"]:
        for o in c.get("outputs", []) if c["cell_type"] == "code" else []:
            texts = [o.get("text", "")] + [v for k, v in o.get("data", {}).items() if k.startswith("text/")]
            texts += [o.get("evalue", "")] + list(o.get("traceback", []))
            for t in texts:
                t = t if isinstance(t, str) else "".join(t)
                found += [t[max(m.start() - 30, 0):m.start() + 50] for m in MACHINE_PATH.finditer(t)]
    return found


def figure_cells(nb: dict) -> list[tuple[str, bool]]:
    """``(first line, shows an image)`` for every code cell that draws a figure (calls ``plt.show()``)."""
    return [(_source(c).splitlines()[0], any("image/png" in o.get("data", {}) for o in c.get("outputs", [])))
            for c in nb["cells"] if c["cell_type"] == "code" and "plt.show()" in _source(c)]


def read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
