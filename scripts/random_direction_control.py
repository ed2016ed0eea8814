"""Random-direction controls for the demo model's refusal direction (README "The demo model").

Re-extracts the direction recorded in the shipped patch's metadata (layer/position) from 128 + 128 train
prompts, then zero-ablates it and random directions of the same norm at every layer, seeds 0..N-1: isotropic
Gaussian ones, and ones matched to it on the model's massive-activation coordinates
(refusal_fast.analysis.massive_activation_dims). Reports the refusal rate on the unseen harmful prompts
(harmful_val + harmbench_test; greedy 24 tokens, substring classifier) and the first-token KL on 200
harmless_val prompts. Then the activation-addition control: the direction itself and each random vector (same
norm) added at the direction's layer on those 200 harmless_val prompts, refusal rate vs no intervention.
~25 minutes on 2 CPU cores.

    python scripts/random_direction_control.py --out runs/random_control.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_refusal_patch as T  # noqa: E402  (generation, classifier and ablation hooks shared with training)

from refusal_fast import datasets, load_demo_model  # noqa: E402
from refusal_fast.demo_model import read_patch_metadata  # noqa: E402
from refusal_fast.evaluate import save_json  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="random directions per kind (seeds 0..N-1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, tok = load_demo_model()
    meta = read_patch_metadata()
    sel = meta["metrics"]["directions"]["selected"]
    layer, pos = sel["layer"], sel["pos"]
    r = T.control_direction(model, tok, meta, layer, pos)
    unseen = datasets.instructions("harmful_val") + datasets.instructions("harmbench_test")
    hv = T.control_harmless(200)
    ref_lp = T.last_logprobs(model, tok, hv)

    plain = T.rate(T.generate_texts(model, tok, unseen, 24))
    effect = T.ablation_effect(model, tok, r, unseen, hv, ref_lp, plain, 24)
    print(f"plain {plain:.3f}; refusal direction ablated {effect['unseen_harmful']:.3f}, "
          f"harmless KL {effect['kl_first_token_harmless']:.4f}", flush=True)
    res = {"layer": layer, "pos": pos, "n_unseen": len(unseen), "n_harmless": len(hv), "plain": plain,
           "refusal_direction": {k: effect[k] for k in ("unseen_harmful", "kl_first_token_harmless")}}
    plain_hv = T.rate(T.generate_texts(model, tok, hv, 24))
    with T.direction_hooks(model, add=r.float(), add_layer=layer):
        added = T.rate(T.generate_texts(model, tok, hv, 24))
    print(f"harmless_val: plain {plain_hv:.3f}; refusal direction added at layer {layer}: {added:.3f}", flush=True)
    res["actadd_refusal_direction"] = {"layer": layer, "plain_harmless": plain_hv, "harmless_refusal": added}
    res.update(T.random_controls(model, tok, r, unseen, hv, ref_lp, plain, seeds=list(range(args.seeds)),
                                 n_tokens=24, actadd_layer=layer, plain_hv=plain_hv))
    if args.out is not None:
        save_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
