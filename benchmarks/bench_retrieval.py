"""Retrieval: embedding throughput, exact all-pairs top-k against its sgemm floor, and an IVF index at scale.

    python benchmarks/bench_retrieval.py                         # 10k and 100k exact, IVF at 1M
    python benchmarks/bench_retrieval.py --sizes 10000 --ivf-size 200000   # a quick run

1. **Embedding throughput** of the VLM's vision tower (the tiny-world model if a run exists, else a
   tiny random LLaVA): images/s batched (``--embed-batch``) against one image at a time.
2. **Exact all-pairs top-k** (``realign_lib.retrieval.nearest_others`` over a FAISS flat
   inner-product index, self and duplicates excluded) on synthetic 768-d clustered unit vectors,
   against the *floor*: the matrix products ``X · Xᵀ`` of the same size done by one ``sgemm`` per
   block (numpy), measured in the same run. Target ≤ 1.5× at 100k.
3. **IVF at scale**: ``IndexIVFFlat`` (``--nlist`` lists, k-means on 64 per list) built on ``--ivf-size`` vectors; ``nprobe`` is
   raised until recall@10 against exact search on ``--queries`` sampled rows reaches 0.95; build
   time, per-query time and the extrapolated all-pairs time are reported.

Figures go to ``benchmarks/results/retrieval.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic(n: int, d: int = 768, clusters: int = 1000, seed: int = 0, noise: float = 1.5) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (a crude stand-in for image embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def sgemm_floor(x: np.ndarray, block: int) -> float:
    """Seconds for the products X[b] · Xᵀ over all row blocks (the arithmetic exact search must do)."""
    t0 = time.perf_counter()
    for s in range(0, x.shape[0], block):
        _ = x[s:s + block] @ x.T
    return time.perf_counter() - t0


def embed_throughput(n: int, batch: int) -> dict:
    import torch

    from realign_lib.models import vlm

    model_dir = next((ROOT / r / "model" / "tiny_vlm" for r in ("runs/tiny_world", "runs/tiny_world_comparison")
                      if (ROOT / r / "model" / "tiny_vlm" / "config.json").is_file()), None)
    if model_dir is not None:
        model, processor = vlm.load_vlm(model_dir, device="cpu")
        size = 64
    else:
        from tests.support.tiny_models import tiny_llava
        model, processor = tiny_llava()
        size = 32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    vlm.image_embeddings(model, processor, images[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    vlm.image_embeddings(model, processor, images, batch_size=batch)
    t_batched = time.perf_counter() - t0
    m = min(n, 256)
    t0 = time.perf_counter()
    vlm.image_embeddings(model, processor, images[:m], batch_size=1)
    t_single = time.perf_counter() - t0
    return {"model": str(model_dir or "tiny random LLaVA"), "images": n, "batch": batch,
            "images_per_s_batched": n / t_batched, "images_per_s_one_at_a_time": m / t_single,
            "speed_up": (n / t_batched) / (m / t_single), "threads": torch.get_num_threads()}


def exact_all_pairs(n: int, k: int, block: int) -> dict:
    from realign_lib import retrieval

    x = synthetic(n)
    t0 = time.perf_counter()
    index = retrieval.build_index(x, "flat")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    nbrs, scores, dups = retrieval.nearest_others(index, x, k, batch_size=block)
    t_search = time.perf_counter() - t0
    floor = sgemm_floor(x, block)
    assert (nbrs != np.arange(n)[:, None]).all()
    return {"n": n, "dim": x.shape[1], "k": k, "build_s": t_build, "top_k_s": t_search, "sgemm_floor_s": floor,
            "ratio_to_floor": t_search / floor, "gflops_floor": 2 * n * n * x.shape[1] / floor / 1e9}


def ivf_at_scale(n: int, queries: int, k: int = 10, nlist: int | None = None) -> dict:
    import faiss

    from realign_lib import retrieval

    clusters, noise = max(n // 100, 1), 1.0  # ~100 points per cluster, cosine ≈ 0.5 within a cluster
    x = synthetic(n, clusters=clusters, noise=noise, seed=1)
    rng = np.random.default_rng(2)
    q_idx = rng.choice(n, queries, replace=False)
    q = x[q_idx]
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, truth = flat.search(q, k + 1)
    del flat
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = retrieval.build_index(x, "ivf", nlist=nlist, nprobe=1)
    t_build = time.perf_counter() - t0
    rows = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, found = index.search(q, k + 1)
        t_q = (time.perf_counter() - t0) / queries
        recall = float(np.mean([len(set(f[f != i][:k]) & set(t[t != i][:k])) / k
                                for f, t, i in zip(found, truth, q_idx)]))
        rows.append({"nprobe": nprobe, "recall_at_10": recall, "seconds_per_query": t_q})
        if recall >= 0.95:
            break
    best = rows[-1]
    return {"n": n, "data": f"{clusters} clusters of ~{n // clusters} unit vectors, noise {noise}", "nlist": index.nlist,
            "build_s": t_build, "queries": queries, "sweep": rows,
            "nprobe": best["nprobe"], "recall_at_10": best["recall_at_10"],
            "all_pairs_estimate_s": best["seconds_per_query"] * n,
            "exact_seconds_per_query": t_exact / queries, "exact_all_pairs_estimate_s": t_exact / queries * n,
            "target_met": best["recall_at_10"] >= 0.95}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="exact all-pairs sizes")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--ivf-size", type=int, default=1_000_000, help="0 skips the IVF part")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists (0: the kit's default 4·sqrt(N))")
    ap.add_argument("--embed-images", type=int, default=2048, help="0 skips the embedding part")
    ap.add_argument("--update", action="store_true", help="keep the parts of an existing --out file that this run skips")
    ap.add_argument("--embed-batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    args = ap.parse_args(argv)

    import faiss
    import torch

    out = {"benchmark": "retrieval", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()},
           "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "torch": torch.__version__}}
    path = Path(args.out)
    if args.update and path.is_file():
        out = {**json.loads(path.read_text()), **{k: out[k] for k in ("when", "machine", "versions")}}
    if args.embed_images:
        e = embed_throughput(args.embed_images, args.embed_batch)
        out["embedding"] = e
        print(f"embedding: {e['images_per_s_batched']:.0f} images/s batched ({args.embed_batch}) vs "
              f"{e['images_per_s_one_at_a_time']:.0f} one at a time: {e['speed_up']:.1f}x", flush=True)
    if args.sizes or not args.update:
        out["exact"] = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        r = exact_all_pairs(n, args.k, args.block)
        out["exact"].append(r)
        print(f"exact top-{args.k} over {n:,}: {r['top_k_s']:.2f} s vs sgemm floor {r['sgemm_floor_s']:.2f} s "
              f"({r['ratio_to_floor']:.2f}x; floor {r['gflops_floor']:.0f} GFLOP/s)", flush=True)
    if args.ivf_size:
        r = ivf_at_scale(args.ivf_size, args.queries, nlist=args.nlist or None)
        out["ivf"] = r
        print(f"IVF at {r['n']:,} (nlist {r['nlist']}): build {r['build_s']:.1f} s; nprobe {r['nprobe']} gives "
              f"recall@10 {r['recall_at_10']:.3f}; all pairs ≈ {r['all_pairs_estimate_s']:.0f} s "
              f"(exact ≈ {r['exact_all_pairs_estimate_s']:.0f} s)", flush=True)
    from realign_lib.files import write_json

    print(f"wrote {write_json(path, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
