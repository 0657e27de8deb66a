"""Decode tokens/s through ``Engine.generate``: the model step and the sampler together.

``gptoss bench`` times the model (it takes the argmax itself); this times what ``gptoss chat``
and ``gptoss serve`` run, so a change to the sampler shows here. Random weights in a preset's
shape on the CPU, one thread, float32; a 64-token prompt, 257 generated tokens, the best of
``--repeat`` runs per sampling setting. The last line is JSON.

    python benchmarks/sampler_decode.py --preset tiny
    python benchmarks/sampler_decode.py --preset small --params '{"presence_penalty": 0.5, "top_k": 50}'
"""

from __future__ import annotations

import gptoss_cli  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import argparse
import json

import torch

from gptoss_cli.config import PRESETS
from gptoss_cli.engine import Engine

SETTINGS = {"greedy": {"temperature": 0}, "T=1 top_p=0.95": {"temperature": 1.0, "top_p": 0.95},
            "T=1": {"temperature": 1.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--params", default="{}", help="more sampling parameters, as JSON (logit_bias keys are ids)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    extra = json.loads(args.params)
    if "logit_bias" in extra:
        extra["logit_bias"] = {int(k): v for k, v in extra["logit_bias"].items()}
    torch.set_num_threads(1)
    eng = Engine.random(PRESETS[args.preset], device="cpu", dtype="float32", max_context=4096)
    prompt = list(range(1000, 1064))
    result = {"preset": args.preset, "params": args.params, "ops": eng.runtime_info()["ops"], "decode_tok_s": {}}
    for label, kw in SETTINGS.items():
        best = 0.0
        for r in range(args.repeat):
            eng._reset()
            for _ in eng.generate(prompt, max_new_tokens=257, seed=r, **kw, **extra):
                pass
            st = eng.last_stats
            best = max(best, st.decode_tokens / st.decode_s)
        result["decode_tok_s"][label] = round(best, 1)
        print(f"{label:>16}: {best:7.1f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
