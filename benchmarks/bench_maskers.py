"""The constrained local-LLM masker against the rule masker, on multi-paragraph free-form descriptions.

    python benchmarks/bench_maskers.py --texts 200 --budget 900 --threads 1

Texts: :func:`tests.support.freeform.freeform_descriptions` (seed 0), where each word is tagged
object / attribute / relation / other. Both maskers mask the same texts; each output goes
through :func:`realign_lib.masking.core.validate_masking`, and :func:`tests.support.freeform.masking_quality`
gives the mask rate, the share of masked words that are objects, attributes or relations
(content share) and the share of object nouns masked (object recall).

The constrained masker's ``bias`` (added to the log-probability of ``[MASK]``) is chosen on
*other* texts (seed 1, ``--calib`` of them): the bias at which its decisions there (unbiased
context) would mask as many words as the rule masker does on them; ``--bias`` fixes it instead.
Also reported there: how well the model's mask-vs-copy margin alone separates content words from
the rest (ROC AUC; 0.5 is chance). The LLM runs in batches until ``--budget`` seconds of masking
are spent; the figures say how many texts it reached, and the rule masker's are given on the
same texts and on all of them. Figures go to ``benchmarks/results/maskers.json``. On a busy
2-core CPU use ``--threads 1`` (two threads there were about ten times slower per step).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties half."""
    if not pos or not neg:
        return None
    neg = sorted(neg)
    import bisect

    return sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
               for p in pos) / (len(pos) * len(neg))


def quality(docs, outputs) -> dict:
    """Validity of ``outputs`` and :func:`masking_quality` over the valid ones."""
    from realign_lib.masking.core import validate_masking
    from tests.support.freeform import masking_quality

    checks = [validate_masking(d.text, o) if isinstance(o, str) else None for d, o in zip(docs, outputs)]
    ok = [(d, c) for d, c in zip(docs, checks) if c is not None and c.ok]
    q = masking_quality([d for d, _ in ok], [[(s.start, s.end) for s in c.spans] for _, c in ok])
    reasons: dict = {}
    for c, o in zip(checks, outputs):
        if c is None or not c.ok:
            r = getattr(o, "reason", None) or c.reason
            reasons[r] = reasons.get(r, 0) + 1
    return {"validity": len(ok) / len(docs) if docs else None, "invalid": reasons, **q}


def calibrate(masker, rule, docs) -> dict:
    """The bias giving the rule masker's mask rate on ``docs`` from unbiased decisions, and the AUCs."""
    rows = masker._decode([d.text for d in docs])
    target = quality(docs, rule.mask_batch([d.text for d in docs]))["mask_rate"]
    by = {"content": [], "object": [], "other": []}
    margins = []
    for d, row in zip(docs, rows):
        cat = {(a, b): c for a, b, c in d.words}
        for w, m in zip(row.words, row.margins):
            margins.append(m)
            c = cat.get(w)
            if c in ("object", "attribute", "relation"):
                by["content"].append(m)
            if c in ("object", "other"):
                by[c].append(m)
    margins.sort(reverse=True)
    k = min(len(margins) - 1, max(0, round(target * len(margins)) - 1))
    return {"texts": len(docs), "rule_mask_rate": target, "bias": -(margins[k] + margins[k + 1]) / 2
            if k + 1 < len(margins) else -margins[k] + 1e-3,
            "auc_content_vs_other": auc(by["content"], by["other"]), "auc_object_vs_other": auc(by["object"], by["other"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--calib", type=int, default=8, help="seed-1 texts for choosing the bias")
    ap.add_argument("--bias", type=float, default=None, help="fix the bias (no calibration)")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds of LLM masking at most")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model", default="", help="as HFMasker: empty for SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "maskers.json"))
    args = ap.parse_args(argv)

    import torch

    from realign_lib.files import write_json
    from realign_lib.masking.constrained import ConstrainedMasker
    from realign_lib.masking.rule import RuleMasker
    from tests.support.freeform import freeform_descriptions

    if args.threads:
        torch.set_num_threads(args.threads)
    docs = freeform_descriptions(args.texts, seed=0)
    rule = RuleMasker()
    t0 = time.perf_counter()
    rule_all = quality(docs, rule.mask_batch([d.text for d in docs]))
    rule_s = time.perf_counter() - t0
    llm = ConstrainedMasker(args.model, batch_size=args.batch)
    cal = None
    if args.bias is None:
        cal = calibrate(llm, rule, freeform_descriptions(args.calib, seed=1))
        args.bias = cal["bias"]
        print(f"calibration on {cal['texts']} seed-1 texts: bias {args.bias:.2f}; margin AUC content vs other "
              f"{cal['auc_content_vs_other']:.3f}, objects vs other {cal['auc_object_vs_other']:.3f}", flush=True)
    llm.bias = args.bias
    outputs: list = []
    t0 = time.perf_counter()
    while len(outputs) < len(docs) and time.perf_counter() - t0 < args.budget:
        outputs += llm.mask_batch([d.text for d in docs[len(outputs):len(outputs) + args.batch]])
        print(f"  constrained: {len(outputs)} texts, {time.perf_counter() - t0:.0f} s", flush=True)
    llm_s = time.perf_counter() - t0
    done = docs[:len(outputs)]
    res = {"constrained": {"masker": llm.name, "bias": args.bias, "seconds": round(llm_s, 1),
                           **quality(done, outputs), "stats": dict(llm.stats)},
           "rule_same_texts": {"masker": rule.name, **quality(done, rule.mask_batch([d.text for d in done]))},
           "rule_all_texts": {"masker": rule.name, "seconds": round(rule_s, 2), **rule_all}}
    print(f"{'masker':<18} {'texts':>5} {'valid':>7} {'mask rate':>9} {'content':>8} {'obj recall':>10}")
    for k, r in res.items():
        print(f"{k:<18} {r['texts']:>5} {r['validity']:>7.1%} {r['mask_rate']:>9.1%} {r['content_share']:>8.1%} "
              f"{r['object_recall']:>10.1%}")
    summary = {"benchmark": "maskers", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
               "texts_requested": args.texts, "texts_constrained": len(outputs), "calibration": cal, **res}
    print(f"wrote {write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
