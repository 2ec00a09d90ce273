"""``realign`` — run the numbered notebooks headlessly with papermill, or train from the command line.

    realign run --config configs/tiny_world.yaml            # every stage, resuming finished ones
    realign run --config configs/tiny_world.yaml --stage 0  # one stage
    realign run --config ... --set seed=1 --set 04_training.beta=0.2 --redo
    realign train --preferences P --model M --output-dir O --set loss=rdpo --set learning_rate=5e-4
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m realign_lib.run.cli train ...

Each stage's executed notebook goes to ``<run_dir>/<stage>/<stage>.ipynb`` and a marker
``<run_dir>/<stage>/.done.json`` (with the parameters, the notebook's hash and a digest of every
earlier stage's marker) is written when it succeeds; a stage whose marker matches all three is
skipped unless ``--redo``. So a stage that ran again (other parameters, ``--redo``) makes every
later stage run again too: nothing downstream is kept that was made from its old outputs. The
first failing stage stops the chain with the failing cell and error shown.

A stage may run several times in one config under *variant* keys ``"<stage>/<name>"`` (for
example ``"04_training/dpo_seed1"`` with ``loss: dpo, seed: 1``): the same notebook, its own
parameters, its executed notebook and marker in ``<run_dir>/<stage>/<name>/``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from realign_lib.run.config import NOTEBOOK_DIR, load_config, parse_override
from realign_lib.run.workspace import CHAIN_ENV, resolve_run_dir

__all__ = ["main", "run_stage", "upstream_digest", "seed_run", "train_main"]


def upstream_digest(stage: str, stages: list[str], run_dir: Path) -> dict[str, str | None]:
    """``earlier stage → sha256 of its marker`` (None if it has none) for every stage of the config with
    a lower number than ``stage`` (variants of one stage, e.g. 04_training/*, do not depend on each other)."""
    from realign_lib.cache import file_digest

    out = {}
    for other in stages:
        if other[:2] < stage[:2]:
            m = run_dir / other / ".done.json"
            out[other] = file_digest(m) if m.is_file() else None
    return out


def seed_run(src: str | os.PathLike, dest: str | os.PathLike, stages, only=None, run_dir: str | None = None) -> Path:
    """Start the run folder ``dest`` from the finished run ``src``: copy its top-level entries (those
    named in ``only``, default all) and rewrite the copied stage markers as if those stages had run in
    ``dest``. A run there then skips each copied stage whose parameters are unchanged and runs the
    others and every later one (a recipe search builds the world and the pairs once this way).
    ``stages``: the config's stage keys. ``run_dir``: the ``run_dir`` parameter the run will give the
    stages (default ``dest``; for a world folder ``<run_dir>/world<k>`` of a config with ``worlds``,
    that config's ``run_dir``)."""
    import json
    import shutil

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    for entry in src.iterdir():
        if (only is None or entry.name in only) and entry.name != ".realign.lock":
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, dest / entry.name)
    stages = sorted(stages)
    for stage in stages:  # in stage order: a marker's upstream digest covers the earlier rewritten ones
        marker = dest / stage / ".done.json"
        if marker.is_file():
            m = json.loads(marker.read_text())
            m["parameters"]["run_dir"] = str(dest) if run_dir is None else str(run_dir)
            m["upstream"] = upstream_digest(stage, stages, dest)
            marker.write_text(json.dumps(m))
    return dest


def run_stage(stage: str, params: dict, run_dir: Path, redo: bool = False, log=print,
              upstream: dict | None = None) -> str:
    """Execute one notebook with papermill; returns ``"done"``, ``"skipped"`` or raises.

    ``upstream``: :func:`upstream_digest` of the earlier stages; a finished stage is skipped only if
    its parameters, notebook and upstream are all unchanged."""
    import papermill as pm

    from realign_lib.files import read_json, write_json

    base = stage.split("/", 1)[0]
    nb = NOTEBOOK_DIR / f"{base}.ipynb"
    out_dir = run_dir / stage  # <run_dir>/<stage> or, for a variant, <run_dir>/<stage>/<name>
    marker = out_dir / ".done.json"
    from realign_lib.run.nbstore import read as read_notebook
    from realign_lib.run.nbstore import source_digest

    nb_hash = source_digest(read_notebook(nb))  # the cells' sources: storing new outputs in it changes nothing
    if not redo and marker.is_file():
        done = read_json(marker)
        if (done.get("parameters") == params and done.get("notebook_sha256") == nb_hash
                and done.get("upstream", {}) == (upstream or {})):
            log(f"[{stage}] complete with the same parameters, notebook and inputs: skipped (use --redo to run it "
                f"again)")
            return "skipped"
        if done.get("upstream", {}) != (upstream or {}):
            log(f"[{stage}] an earlier stage ran again since: running again")
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{stage}] running {nb.name} → {out_dir / nb.name}")
    t0 = time.time()
    # the kernel gets the run folder this command resolved, absolute: the two can never disagree
    pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=dict(params, run_dir=str(run_dir)),
                        kernel_name="python3", language="python", cwd=str(Path.cwd()), progress_bar=False,
                        log_output=False)
    write_json(marker, {"parameters": params, "notebook_sha256": nb_hash, "upstream": upstream or {},
                        "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log(f"[{stage}] done in {time.time() - t0:.0f} s")
    return "done"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="realign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the notebooks of a recipe config in order")
    r.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    r.add_argument("--stage", type=int, action="append", help="run only stage N (repeatable)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value: seed=1, model_path=/models/x, 04_training.beta=0.2")
    r.add_argument("--redo", action="store_true", help="run stages even if they completed before")
    t = sub.add_parser("train", help="preference training in this process (or each of accelerate's)",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--preferences", required=True, help="preferences.jsonl (stage 03)")
    t.add_argument("--root", default=None, help="folder the image paths are relative to (default: the file's)")
    t.add_argument("--model", required=True, help="model folder or hub id (the reference and starting policy)")
    t.add_argument("--output-dir", required=True, help="where the adapter, logs and results go")
    t.add_argument("--max-records", type=int, default=0, help="train on a seeded subset; 0: as many pairs as max_steps "
                   "steps see (max_steps x global batch), else all — as notebook 04")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PreferenceConfig field, e.g. loss=rdpo, max_steps=300, learning_rate=5e-4")
    t.add_argument("--targs", action="append", default=[], metavar="KEY=VALUE",
                   help="extra transformers.TrainingArguments, e.g. save_strategy=steps")
    args = ap.parse_args(argv)
    return run_main(args) if args.cmd == "run" else train_main(args)


def run_main(args) -> int:
    """``realign run``: every stage of the recipe in order (see the module docstring)."""
    from realign_lib.files import RunLock

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"realign: {err}", file=sys.stderr)
        return 2
    run_dir = resolve_run_dir(cfg.run_dir)  # relative: under $REALIGN_HOME or the repository, as the notebooks do
    stages = list(cfg.stages)
    if args.stage:
        wanted = {f"{n:02d}" for n in args.stage}
        stages = [s for s in stages if s[:2] in wanted]
        if not stages:
            print(f"realign: no stage {sorted(wanted)} in {args.config}", file=sys.stderr)
            return 2
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"run_dir {run_dir} is a file, not a folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, log=lambda m: print(m, flush=True)).__enter__()
    except (OSError, RuntimeError) as err:
        print(f"realign: cannot use run_dir {run_dir}: {err}", file=sys.stderr)
        return 2
    import signal

    def interrupted(signum=None, frame=None):
        # Every file the kit writes is atomic or append-only (kill-safe), so stopping at once loses at most
        # the record in progress; the kernel notices its parent is gone and exits too.
        print("\nrealign: interrupted. Run the same command again to continue: finished stages are skipped and "
              "the interrupted one resumes from what it saved.", file=sys.stderr, flush=True)
        lock.__exit__(None, None, None)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        return _run_stages(cfg, stages, args)
    except KeyboardInterrupt:  # raised inside the kernel and passed on by papermill
        interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
        lock.__exit__(None, None, None)


def kernel_environment() -> dict[str, str]:
    """What the notebooks' kernels inherit during a chain: :data:`CHAIN_ENV` (a missing stage is then
    an error, not a build), and this ``realign_lib`` first on ``PYTHONPATH`` with ``PYTHONSAFEPATH`` set,
    so a kernel started in another checkout imports the library this command runs, not the copy in
    its working directory (the two would resolve a relative run_dir into different folders)."""
    here = str(Path(__file__).resolve().parents[2])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return {CHAIN_ENV: "1", "PYTHONPATH": os.pathsep.join([here] + rest), "PYTHONSAFEPATH": "1"}


def _run_stages(cfg, stages: list[str], args) -> int:
    env = kernel_environment()
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_stages_in_chain(cfg, stages, args)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_stages_in_chain(cfg, stages: list[str], args) -> int:
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    from realign_lib.files import write_json

    run_dir = resolve_run_dir(cfg.run_dir)
    write_json(run_dir / "config.json", {"config": args.config, "overrides": args.overrides, "run_dir": cfg.run_dir,
                                         "seed": cfg.seed, "worlds": cfg.worlds, "shared": cfg.shared,
                                         "stages": cfg.stages})
    t0 = time.time()
    plan = cfg.plan(stages)
    for i, (stage, folder, params) in enumerate(plan, 1):
        where = run_dir / folder if folder else run_dir
        name = f"{folder}/{stage}" if folder else stage
        print(f"== stage {i}/{len(plan)}: {name}", flush=True)
        if folder:
            upstream = upstream_digest(stage, list(cfg.stages), where)
        else:  # over every world (or the run folder itself)
            upstream = {f"{f}/{k}" if f else k: v for f in ([cfg.world_folder(w) for w in cfg.worlds] or [""])
                        for k, v in upstream_digest(stage, list(cfg.stages), run_dir / f if f else run_dir).items()}
        try:
            run_stage(stage, params, where, redo=args.redo, log=lambda m: print(m, flush=True), upstream=upstream)
        except pm.PapermillExecutionError as err:
            if err.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel too (the whole process group)
                raise KeyboardInterrupt from None
            print(f"realign: stage {name} failed in cell {err.exec_count} ({err.ename}: {err.evalue})\n"
                  f"  executed notebook with the traceback: {where / stage / (stage.split('/')[0] + '.ipynb')}",
                  file=sys.stderr)
            return 1
        except DeadKernelError:  # killed from outside: out of memory (the kernel OOM killer), kill -9 …
            print(f"realign: the kernel of stage {name} died (killed from outside: out of memory, or kill -9). "
                  f"What it saved is kept: run the same command again to resume.", file=sys.stderr)
            return 1
        except OSError as err:  # writing the executed notebook or a marker: a full disk, a read-only folder
            print(f"realign: stage {name} could not write in {where}: {err.strerror or err} "
                  f"({err.filename or 'a file'}). Free space or fix the folder, then run the same command again "
                  f"to resume.", file=sys.stderr)
            return 1
    print(f"== all {len(plan)} stage(s) finished in {time.time() - t0:.0f} s; results in {run_dir}", flush=True)
    return 0


TRAIN_HELP = """Preference training on preferences.jsonl, in one process or under ``accelerate launch``:

    realign train --preferences runs/tiny_world/03_induction/preferences.jsonl --root runs/tiny_world \\
        --model runs/tiny_world/model/tiny_vlm --output-dir runs/x/04_training/rdpo \\
        --set loss=rdpo --set max_steps=300 --set per_device_train_batch_size=8 --set learning_rate=5e-4
    accelerate launch --num_processes 2 --cpu -m realign_lib.run.cli train ...   # two processes on a CPU box

--set KEY=VALUE sets any realign_lib.training.config.PreferenceConfig field (the names notebook 04 and the
recipes use; values parsed as YAML). Unset fields keep the paper's defaults (batch 1 x accumulation
8, LoRA r 128 on the language model, lr 1e-5, one epoch). The global batch is
per_device_train_batch_size x processes x gradient_accumulation_steps. Writes into --output-dir the
adapter (or full model) and processor, train_log.jsonl and train_result.json; a killed run started
again with the same command continues from its last complete checkpoint. For the tiny model on a
CPU, OMP_NUM_THREADS=1 is fastest.
"""


def train_main(args) -> int:
    """``realign train``: :func:`realign_lib.training.trainer.train` with the command line's settings."""
    import json
    import os

    from realign_lib.training.config import PreferenceConfig

    try:
        settings = dict(parse_override(p) for p in args.overrides)
        cfg = PreferenceConfig.from_dict(settings)
        targs = dict(parse_override(p) for p in args.targs)
        cfg.check_overrides(targs)
    except (ValueError, TypeError) as err:
        print(f"realign train: {err}", file=sys.stderr)
        return 2
    from realign_lib.training.trainer import train

    try:
        res = train(args.preferences, args.model, args.output_dir, cfg, root=args.root,
                    max_records=args.max_records, training_overrides=targs)
    except (ValueError, FileNotFoundError) as err:  # the user's input: the message says what and where
        print(f"realign train: {err}", file=sys.stderr)
        return 2
    res.pop("trainer")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: res[k] for k in ("loss", "steps", "records", "processes", "global_batch", "final",
                                              "seconds")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
