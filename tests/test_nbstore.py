"""Stored notebook outputs: digest of the sources only, outputs copied from papermill's copy, machine paths gone."""
import copy

import pytest

from realign_lib.run import nbstore


def _nb(*sources):
    return {"cells": [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
                      for s in sources], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_the_digest_covers_sources_not_outputs():
    nb = _nb("x = 1", "print(x)")
    d = nbstore.source_digest(nb)
    shown = copy.deepcopy(nb)
    shown["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    assert nbstore.source_digest(shown) == d
    edited = _nb("x = 2", "print(x)")
    assert nbstore.source_digest(edited) != d
    assert nbstore.source_digest(_nb(["x = ", "1"], "print(x)")) == d  # list-of-lines sources as jupytext writes


def test_outputs_come_from_the_executed_copy_without_machine_paths():
    source = _nb("run_dir = 'runs/a'", "print(run)", "plt.show()")
    source["cells"][0]["metadata"]["tags"] = ["parameters"]
    executed = copy.deepcopy(source)
    injected = {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "run_dir = '/tmp/x/run'",
                "outputs": [], "execution_count": 2}
    executed["cells"].insert(1, injected)
    executed["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                        "text": "model /work/repo/runs/tiny_world/model and /work/repo/README.md\n"}]
    executed["cells"][3]["outputs"] = [{"output_type": "display_data", "metadata": {},
                                        "data": {"image/png": "iVBOR/tmp/", "text/plain": "<Figure>"}}]
    executed["metadata"]["papermill"] = {"parameters": {"run_dir": "/tmp/x"}}
    assert nbstore.machine_paths(executed)  # the raw copy names this machine's folders
    out = nbstore.with_outputs(source, executed, {"/work/repo/runs/tiny_world": "runs/tiny_world", "/work/repo/": ""},
                               outputs_from="test")
    assert len(out["cells"]) == 3 and "papermill" not in out["metadata"]
    assert out["cells"][1]["outputs"][0]["text"] == "model runs/tiny_world/model and README.md\n"
    assert out["cells"][2]["outputs"][0]["data"]["image/png"] == "iVBOR/tmp/"  # images are not rewritten
    assert nbstore.machine_paths(out) == []
    assert out["metadata"]["realign"]["source_sha256"] == nbstore.source_digest(source)
    assert nbstore.figure_cells(out) == [("plt.show()", True)]
    assert source["cells"][1]["outputs"] == []  # the source notebook itself is not changed
    stale = _nb("run_dir = 'runs/a'", "print(run, 1)", "plt.show()")
    with pytest.raises(ValueError, match="other notebook sources"):
        nbstore.with_outputs(stale, executed, {}, outputs_from="test")
