"""Figures the notebooks and the docs share (matplotlib, imported when a function is called).

* :func:`method_overview` — Re-Align's Algorithm 1 as the kit runs it: the stages, what each does and
  the files it hands to the next (``python -m realign_lib.figures docs/overview.png`` writes the README's copy).
"""
from __future__ import annotations

import sys

__all__ = ["STAGE_BOXES", "method_overview", "draw_words"]

#: (stage, what it does, the file it hands over) in run order
STAGE_BOXES = [
    ("00 data", "images + chosen answers y_w\n(tiny world or LLaVA-Instruct)", "data/samples.jsonl"),
    ("01 retrieval", "embed every image v;\nFAISS top-k similar images v_l", "01_retrieval/neighbours.jsonl"),
    ("02 masking", "hide objects, attributes,\nrelations of y_w: y_m", "02_masking/masked.jsonl"),
    ("03 induction", "the VLM fills y_m looking at v_l;\nfirst fill with s(y_w, ŷ) < τ: y_l", "03_induction/preferences.jsonl"),
    ("04 rDPO", "L = L_DPO(y_w ≻ y_l | v)\n  + L_vDPO(v ≻ v_l | y_w)", "04_training/<run>/ (LoRA adapter)"),
    ("05 evaluation", "POPE, MME, CHAIR;\nconditions paired over seeds", "05_evaluation/comparison.md"),
]


def method_overview(ax=None):
    """Draw the stages of :data:`STAGE_BOXES` left to right, each with the file it writes under it and an
    arrow to the next; the four steps of the paper's Algorithm 1 are stages 01-04. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(16, 3))
    n, w, gap = len(STAGE_BOXES), 1.25, 0.3
    for i, (name, what, out) in enumerate(STAGE_BOXES):
        x = i * (w + gap)
        step = 1 <= i <= 4
        ax.add_patch(FancyBboxPatch((x, 0.35), w, 0.55, boxstyle="round,pad=0.02",
                                    fc="#e8f0fb" if step else "#f2f2f2", ec="#3465a4" if step else "grey"))
        ax.text(x + w / 2, 0.8, name, ha="center", va="center", fontsize=10, fontweight="bold")
        ax.text(x + w / 2, 0.56, what, ha="center", va="center", fontsize=7)
        ax.text(x + w / 2, 0.22, out, ha="center", va="center", fontsize=7, family="monospace", color="#555555")
        if i < n - 1:
            ax.annotate("", xy=(x + w + gap - 0.02, 0.62), xytext=(x + w + 0.02, 0.62),
                        arrowprops={"arrowstyle": "->", "color": "black"})
    ax.text(1 * (w + gap), 1.0, "Algorithm 1 (the paper's four steps): stages 01-04", fontsize=8, color="#3465a4")
    ax.set_xlim(-0.1, n * (w + gap) - gap + 0.1)
    ax.set_ylim(0.1, 1.08)
    ax.axis("off")
    return fig or ax.figure


def draw_words(ax, y, label, words, colour="crimson", size=8.5, line=0.085) -> float:
    """Write ``label`` (grey) then ``words`` in a monospace font from the left edge of ``ax`` down,
    wrapping at the axis width; continuation lines are indented past the label.

    ``words``: ``(word, style)`` pairs — a falsy style is plain text, ``True`` bold in ``colour``, a dict
    those matplotlib text properties (e.g. ``{"bbox": {...}}`` for a coloured box). ``y`` and the
    returned next-line ``y`` are in axis units; call it after the figure's layout is final.
    """
    probe = ax.text(0, 0, "x" * 40, family="monospace", fontsize=size, transform=ax.transAxes)
    box = probe.get_window_extent(renderer=ax.figure.canvas.get_renderer()).transformed(ax.transAxes.inverted())
    probe.remove()
    cw = box.width / 40                                  # one character's width, in axis units
    indent = len(label) + 1 if label else 0
    if label:
        ax.text(0, y, label, family="monospace", fontsize=size, color="gray", transform=ax.transAxes, va="top")
    col = indent
    for w, style in words:
        if (col + len(w)) * cw > 1.0 and col > indent:
            col, y = indent, y - line
        kw = style if isinstance(style, dict) else {"color": colour, "fontweight": "bold"} if style else {}
        ax.text(col * cw, y, w, family="monospace", fontsize=size, transform=ax.transAxes, va="top", **kw)
        col += len(w) + 1
    return y - line


if __name__ == "__main__":  # python -m realign_lib.figures docs/overview.png
    import matplotlib

    matplotlib.use("Agg")
    method_overview().savefig(sys.argv[1] if len(sys.argv) > 1 else "overview.png", dpi=90, bbox_inches="tight")
