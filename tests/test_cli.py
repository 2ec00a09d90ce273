"""`realign run` as a careless user meets it: one run per folder, a run folder that is a file,
Ctrl-C, a non-UTF-8 input file."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realign_lib.files import RunLock, read_json, read_jsonl


def _config(tmp_path, run_dir) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {run_dir}\nstages:\n  '00_tiny_world': {{n_train: 1500, n_test: 120, n_mme: 10, n_val: 60, "
                 f"n_samples: 300, tower_steps: 120, sft_steps: 150, sft_restarts: 0, health_check: false}}\n")  # the smoke sizes
    return str(p)


def _realign(root, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", *args], cwd=root, capture_output=True,
                          text=True, timeout=timeout)


def test_a_second_run_on_one_folder_refuses_at_once(root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):  # as if another `realign run` were working in this folder
        t0 = time.time()
        res = _realign(root, "--config", _config(tmp_path, run_dir))
        assert res.returncode == 2 and f"is in use by another run (pid {os.getpid()}" in res.stderr
        assert time.time() - t0 < 60 and not (run_dir / "00_tiny_world").exists()  # nothing started
    assert not (run_dir / ".realign.lock").exists()  # released on exit


def test_a_stale_lock_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs: a run killed with -9 left its lock behind
    import socket

    (tmp_path / ".realign.lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                                       "since": "yesterday"}))
    os.utime(tmp_path / ".realign.lock", (time.time() - 60, time.time() - 60))
    said = []
    with RunLock(tmp_path, log=said.append):
        assert json.loads((tmp_path / ".realign.lock").read_text())["pid"] == os.getpid()
    assert said and "stale lock" in said[0]
    with RunLock(tmp_path), pytest.raises(RuntimeError, match="in use by another run"):
        with RunLock(tmp_path):
            pass


def test_run_dir_that_is_a_file_is_a_message_not_a_traceback(root, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = _realign(root, "--config", _config(tmp_path, tmp_path / "afile"))
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_saying_what_to_rerun(root, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", _config(tmp_path, run_dir)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "00_tiny_world").exists() and time.time() < deadline:  # the stage has started
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group, the kernel too
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    ours = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("[IPKernelApp]")]
    assert ours[-1].startswith("realign: interrupted. Run the same command again to continue"), err[-2000:]
    assert "realign_lib/run/cli.py" not in err and "PapermillExecutionError" not in err  # no traceback of the kit's
    assert not (run_dir / ".realign.lock").exists()


def test_a_non_utf8_file_names_file_and_line(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2: not UTF-8 text \(byte 0xe9 at column 12\)"):
        read_jsonl(p)
    q = tmp_path / "x.json"
    q.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"x.json:1: not UTF-8 text \(byte 0xff at column 8\)"):
        read_json(q)
    from realign_lib.evaluation.mme import load_mme

    task = tmp_path / "MME" / "existence"
    task.mkdir(parents=True)
    (task / "a.png").write_bytes(b"")
    (task / "a.txt").write_bytes("Is there a dog?\tYes\nIs there a cat?\tNo\n".encode() + b"Is there a b\xe4r?\tNo\n")
    with pytest.raises(ValueError, match=r"a.txt:3: not UTF-8 text \(byte 0xe4 at column 13\)"):
        load_mme(tmp_path / "MME")


def test_realign_train_refuses_a_setting_given_twice(root, tmp_path):
    """`--set learning_rate` and `--targs learning_rate` name one setting: an error, not a silent winner."""
    res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "train", "--preferences", str(tmp_path / "p.jsonl"),
                          "--model", str(tmp_path), "--output-dir", str(tmp_path / "out"),
                          "--set", "learning_rate=1e-4", "--targs", "learning_rate=1e-3"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "learning_rate: a PreferenceConfig setting" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_chain_started_from_another_checkout_writes_every_file_in_one_folder(small_world, tmp_path):
    """The `realign` command of one checkout (an editable install) started in a second checkout: a kernel
    started there would import the second checkout's library (its working directory is on its path) and
    resolve a relative run_dir into another folder than the command. The command hands each kernel the
    absolute run folder and its own library first on the path: config, marker, executed notebook and the
    stage's data all land in one folder."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "checkout_b"
    for part in ("realign_lib", "notebooks", "configs"):
        shutil.copytree(root / part, other / part)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REALIGN_HOME")}
    env["HF_HUB_OFFLINE"] = "1"
    name = f"runs/test_two_checkouts_{os.getpid()}"
    cfg = other / "c.yaml"
    cfg.write_text(json.dumps({"run_dir": name, "stages": {"00_real_data": {
        "llava_json": small_world["train_json"], "image_folder": small_world["train_images"], "n_samples": 8}}}))
    command = (f"import sys; sys.path.insert(0, {str(root)!r}); from realign_lib.run.cli import main; "
               f"sys.exit(main(['run', '--config', {str(cfg)!r}]))")  # what the installed `realign` does
    try:
        res = subprocess.run([sys.executable, "-c", command], cwd=other, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        run = root / name  # relative: under the repository of the command's library
        for f in ("config.json", "00_real_data/.done.json", "00_real_data/00_real_data.ipynb",
                  "00_real_data/metrics.json", "data/samples.jsonl"):
            assert (run / f).is_file(), f
        assert len((run / "data" / "samples.jsonl").read_text().splitlines()) == 8
        assert not (other / "runs").exists()  # nothing under the second checkout
    finally:
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.rmtree(other / "runs", ignore_errors=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_lock(folder, pid):
    import socket

    (folder / ".realign.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "before"}))
    os.utime(folder / ".realign.lock", (time.time() - 60, time.time() - 60))


def _started_kernel(dead: int, seconds: int) -> subprocess.Popen:
    """A stand-in kernel of the dead run, returned once /proc shows its environment (until the child has
    exec'd, /proc shows the parent's, without JPY_PARENT_PID: a loaded machine widens that window)."""
    from realign_lib.files import kernels_of

    kernel = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                              env=dict(os.environ, JPY_PARENT_PID=str(dead)))
    deadline = time.time() + 20
    while kernel.pid not in kernels_of(dead) and time.time() < deadline:
        time.sleep(0.01)
    assert kernel.pid in kernels_of(dead)
    return kernel


def test_a_lock_is_not_taken_over_while_the_stopped_runs_kernel_still_writes(tmp_path):
    """After kill -9 of `realign run` its kernel (JPY_PARENT_PID = the dead command) lives on for seconds:
    the next run waits for it, and fails naming it if it does not end."""
    dead = _dead_pid()
    kernel = _started_kernel(dead, 2)
    _stale_lock(tmp_path, dead)
    said, t0 = [], time.time()
    with RunLock(tmp_path, log=said.append):
        assert kernel.poll() is not None and time.time() - t0 > 1.0  # taken only once the kernel ended
        assert read_json(tmp_path / ".realign.lock")["pid"] == os.getpid()
    assert "its notebook kernel" in said[0] and str(kernel.pid) in said[0] and "stale lock" in said[1]
    kernel = _started_kernel(dead, 30)
    try:
        _stale_lock(tmp_path, dead)
        with pytest.raises(RuntimeError, match=rf"still written by a notebook kernel of a stopped run \(pid {kernel.pid}\)"):
            with RunLock(tmp_path, wait=0.5):
                pass
        assert read_json(tmp_path / ".realign.lock")["pid"] == dead  # the old lock stays
    finally:
        kernel.kill()
        kernel.wait()


@pytest.mark.slow
def test_a_kernel_killed_from_outside_is_one_line_saying_to_rerun(root, tmp_path):
    """The kernel dies (an out-of-memory kill looks the same as this kill -9): one line, rc 1, no traceback."""
    from realign_lib.files import kernels_of

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", _config(tmp_path, run_dir)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, kernels = time.time() + 120, []
    while not kernels and time.time() < deadline:
        time.sleep(0.5)
        kernels = kernels_of(proc.pid)
    assert kernels, "no kernel started"
    time.sleep(2)
    for k in kernels:
        os.kill(k, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    ours = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("[IPKernelApp]")]
    assert ours[-1].startswith("realign: the kernel of stage 00_tiny_world died (killed from outside"), err[-2000:]
    assert "Traceback" not in err and "DeadKernelError" not in err
    assert not (run_dir / ".realign.lock").exists()


def test_a_stage_that_cannot_write_its_notebook_is_one_line(root, tmp_path):
    """The executed notebook cannot be written (here: a folder stands where it goes; a full disk is the same
    OSError): one line naming the folder and what to do, rc 1, no traceback."""
    run_dir = tmp_path / "run"
    (run_dir / "00_tiny_world" / "00_tiny_world.ipynb").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", _config(tmp_path, run_dir)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    ours = [x for x in res.stderr.strip().splitlines() if x.strip() and not x.startswith("[IPKernelApp]")]
    assert ours[-1].startswith(f"realign: stage 00_tiny_world could not write in {run_dir}"), res.stderr[-2000:]
    assert "run the same command again" in ours[-1] and "Traceback" not in res.stderr
