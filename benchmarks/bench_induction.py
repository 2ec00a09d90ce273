"""Induction throughput: the batched τ loop against the one-candidate-at-a-time loop, same pairs.

    python benchmarks/bench_induction.py --run runs/tiny_world --samples 256

Needs a run folder with stages 00-02 done (the tiny VLM, ``neighbours.jsonl``, ``masked.jsonl``).
Both variants run :func:`realign_lib.induction.loop.induce` on the same items with the same filler
settings; the only difference is how many candidates go through the VLM per call (``--batch`` vs
1) and how many texts the sentence model encodes per call. The accepted pairs must be identical
(the filler's results do not depend on batch-mates: left padding with matching position ids).
Target: ≥ 5× pairs per second. Figures go to ``benchmarks/results/induction.json``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="run folder (default: runs/tiny_world, else runs/tiny_world_comparison)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "induction.json"))
    args = ap.parse_args(argv)

    import torch

    from realign_lib.files import read_jsonl
    from realign_lib.induction import loop as ind
    from realign_lib.induction.fillers import MaskFiller
    from realign_lib.induction.similarity import SentenceEncoder
    from realign_lib.models import vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run) if args.run else next(
        (ROOT / r for r in ("runs/tiny_world", "runs/tiny_world_comparison")
         if (ROOT / r / "02_masking" / "masked.jsonl").is_file()), None)
    if run is None or not (run / "02_masking" / "masked.jsonl").is_file():
        print("bench_induction: needs a run folder with stages 00-02 (bash scripts/run_tiny_world.sh)", file=sys.stderr)
        return 2
    items, _ = ind.build_items(read_jsonl(run / "data" / "samples.jsonl"), read_jsonl(run / "02_masking" / "masked.jsonl"),
                               read_jsonl(run / "01_retrieval" / "neighbours.jsonl"), run, top_k=args.top_k,
                               limit=args.samples)
    model, processor = vlm.load_vlm(run / "model" / "tiny_vlm", device="cpu")
    results, records = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_induction_"))
    for name, batch in (("one_at_a_time", 1), ("batched", args.batch)):
        filler = MaskFiller(model, processor, mode="slot", batch_size=batch)
        encoder = SentenceEncoder(batch_size=min(batch, 64) if batch > 1 else 1)
        out = tmp / name
        t0 = time.perf_counter()
        if batch == 1:  # the naive loop: every candidate alone through the VLM and the sentence model
            s = ind.induce(items, filler, encoder, args.tau, out / "p.jsonl", out / "s.jsonl", chunk_size=1,
                           progress=False)
        else:
            s = ind.induce(items, filler, encoder, args.tau, out / "p.jsonl", out / "s.jsonl", progress=False)
        sec = time.perf_counter() - t0
        records[name] = read_jsonl(out / "p.jsonl")
        results[name] = {"seconds": sec, "pairs": s["pairs"], "fills": s["fills"], "samples": len(items),
                         "pairs_per_s": s["pairs"] / sec, "fills_per_s": s["fills"] / sec,
                         "seconds_fill": s["seconds_fill"], "seconds_similarity": s["seconds_similarity"]}
        print(f"{name:<14} {sec:7.1f} s  {s['pairs']} pairs from {len(items)} samples  "
              f"{s['pairs'] / sec:6.2f} pairs/s  (fill {s['seconds_fill']:.1f} s, similarity "
              f"{s['seconds_similarity']:.1f} s)", flush=True)
    strip = lambda rs: [(r["id"], r["rank"], r["rejected"]) for r in rs]  # noqa: E731
    same = strip(records["batched"]) == strip(records["one_at_a_time"])
    max_sim_diff = max((abs(a["similarity"] - b["similarity"]) for a, b in
                        zip(records["batched"], records["one_at_a_time"])), default=0.0)
    speed_up = results["batched"]["pairs_per_s"] / results["one_at_a_time"]["pairs_per_s"]
    print(f"speed-up {speed_up:.1f}x (target >= 5x); identical accepted pairs: {same} "
          f"(largest similarity difference {max_sim_diff:.2e})")
    summary = {"benchmark": "induction", "run": str(run), "results": results, "speed_up": speed_up,
               "identical_pairs": same, "max_similarity_difference": max_sim_diff, "target_met": speed_up >= 5 and same,
               "setup": {"samples": len(items), "batch": args.batch, "top_k": args.top_k, "tau": args.tau,
                         "threads": torch.get_num_threads()},
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from realign_lib.files import write_json

    print(f"wrote {write_json(args.out, summary)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
