"""How large is the demo model's harmless KL under ablation, compared with what else moves it?

Re-extracts the direction recorded in the shipped patch's metadata (layer/position; 128 + 128 train prompts, the
same sample as scripts/random_direction_control.py) and reports first-token KL on 200 harmless_val prompts
(the same seeded sample), per prompt (mean / median / 90th percentile) and top-1 agreement, for:

- patched vs patched with the direction zero-ablated at every layer (the number in the README's table),
- base vs patched (what the refusal patch itself does to harmless replies),
- base vs patched + ablated,
- base vs base with the same direction ablated (what removing that direction costs a model that was never
  taught to refuse).

~2 minutes on 2 CPU cores.

    python scripts/harmless_kl_context.py --out runs/harmless_kl_context.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_refusal_patch as T  # noqa: E402  (first-token log-probs and ablation hooks shared with training)

from refusal_fast import load_demo_model  # noqa: E402
from refusal_fast.demo_model import read_patch_metadata  # noqa: E402
from refusal_fast.evaluate import save_json  # noqa: E402


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities ``p``, ``q`` [n, vocab]: [n] float64."""
    p, q = p.double(), q.double()
    return (p.exp() * (p - q)).sum(-1)


def summary(p: torch.Tensor, q: torch.Tensor) -> dict:
    """Per-prompt KL(p || q) statistics and top-1 agreement for log-probs [n, vocab]."""
    k = kl_rows(p, q)
    return {"mean": round(k.mean().item(), 4), "median": round(k.median().item(), 4),
            "p90": round(k.quantile(0.9).item(), 4), "max": round(k.max().item(), 4),
            "top1_agreement": round((p.argmax(-1) == q.argmax(-1)).double().mean().item(), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=Path, default=None, help="refusal patch to evaluate (default: the shipped one)")
    ap.add_argument("--layer", type=int, default=None, help="direction layer (default: the patch metadata's pick)")
    ap.add_argument("--pos", type=int, default=None, help="direction position (default: the patch metadata's pick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, tok = load_demo_model(patch=args.patch)
    base, _ = load_demo_model(base=True)
    meta = read_patch_metadata() if args.patch is None else read_patch_metadata(args.patch)
    sel = meta.get("metrics", {}).get("directions", {}).get("selected") or {}
    layer = args.layer if args.layer is not None else sel.get("layer")
    pos = args.pos if args.pos is not None else sel.get("pos")
    if layer is None or pos is None:
        ap.error("the patch metadata records no selected direction: pass --layer and --pos")
    r = T.control_direction(model, tok, meta, layer, pos)  # same samples as random_direction_control.py
    hv = T.control_harmless(200)
    lp = {"patched": T.last_logprobs(model, tok, hv), "base": T.last_logprobs(base, tok, hv)}
    with T.direction_hooks(model, r=r.float()):
        lp["patched_ablated"] = T.last_logprobs(model, tok, hv)
    with T.direction_hooks(base, r=r.float()):
        lp["base_ablated"] = T.last_logprobs(base, tok, hv)
    pairs = [("patched", "patched_ablated"), ("base", "patched"), ("base", "patched_ablated"),
             ("base", "base_ablated")]
    res = {"layer": layer, "pos": pos, "n_harmless": len(hv),
           "kl": {f"{a} || {b}": summary(lp[a], lp[b]) for a, b in pairs}}
    for name, s in res["kl"].items():
        print(f"KL({name}): " + ", ".join(f"{k} {v}" for k, v in s.items()), flush=True)
    if args.out is not None:
        save_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
