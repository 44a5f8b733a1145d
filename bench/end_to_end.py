"""End to end: a Llama-style Hugging Face model patched with pyformer vs the same model on sdpa.

    python bench/end_to_end.py                      # float32 and bfloat16, the table below
    python bench/end_to_end.py --dtype float32 --repeats 3 --json out.json

Builds a random-weight ``LlamaForCausalLM`` from a small config (8 layers, hidden 512, 8 heads,
2 kv heads, intermediate 1408, vocabulary 8000: the blocks, not the output layer, dominate),
copies it, runs :func:`pyformer.integrations.transformers.patch` on the copy, and times in one
process, alternating the two models so that drift hits both alike:

- forward on a batch of 4 x 512 tokens (``torch.no_grad``);
- a training step: forward, the loss, backward;
- greedy ``generate()`` of 64 new tokens after a 32-token prompt, batch of 4.

Each figure is the median of ``--repeats`` runs after one warm-up; the ratio is unpatched time /
patched time (above 1: pyformer is faster). The patched model's logits are checked against the
unpatched one's first, and the generated tokens compared, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import torch


def _model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(dtype: torch.dtype, repeats: int, batch: int, seq: int, new_tokens: int) -> dict:
    from pyformer.integrations.transformers import patch
    from pyformer.testing import rel_err

    base = _model(dtype)
    fast = copy.deepcopy(base)
    replaced = patch(fast)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8000, (batch, seq), generator=g)
    prompt = torch.randint(0, 8000, (batch, 32), generator=g)
    models = {"sdpa": base, "pyformer": fast}
    for m in models.values():
        m.eval()

    with torch.no_grad():
        err = rel_err(fast(ids).logits.double(), base(ids).logits.double())

    def forward(m):
        with torch.no_grad():
            m(ids)

    def train_step(m):
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()

    outs = {}

    def generate(name, m):
        outs[name] = m.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    result = {"dtype": str(dtype).replace("torch.", ""), "logits_rel_err": err}
    for what, fn in (
        ("forward", lambda n, m: forward(m)),
        ("train step", lambda n, m: train_step(m)),
        ("generate", generate),
    ):
        for name, m in models.items():  # warm-up
            fn(name, m)
        times = {name: [] for name in models}
        for _ in range(repeats):  # alternate the two models
            for name, m in models.items():
                times[name].append(_median_time(lambda: fn(name, m), 1))
        med = {name: statistics.median(t) for name, t in times.items()}
        result[what] = {
            "sdpa_s": med["sdpa"],
            "pyformer_s": med["pyformer"],
            "ratio": med["sdpa"] / med["pyformer"],
        }
    result["generated_equal"] = bool(torch.equal(outs["sdpa"], outs["pyformer"]))
    result["replaced"] = {k: v for k, v in replaced.items() if k != "left"}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    dtypes = ("float32", "bfloat16") if a.dtype == "both" else (a.dtype,)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import transformers

    meta = {
        "commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "model": "Llama, 8 layers, hidden 512, 8 heads, 2 kv heads, intermediate 1408, vocab 8000",
        "batch": a.batch,
        "seq": a.seq,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
    }
    results = [run(getattr(torch, d), a.repeats, a.batch, a.seq, a.new_tokens) for d in dtypes]
    print(
        f"pyformer end to end, commit {commit}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['threads']} threads; {meta['model']}; batch {a.batch} x "
        f"{a.seq} tokens, generate {a.new_tokens} tokens; median of {a.repeats}"
    )
    print()
    print("| dtype | forward | training step | generate | logits rel. err | same tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        cells = [
            f"{r[w]['ratio']:.2f}x ({r[w]['sdpa_s'] * 1e3:.0f} -> {r[w]['pyformer_s'] * 1e3:.0f} ms)"
            for w in ("forward", "train step", "generate")
        ]
        same = "yes" if r["generated_equal"] else "no"
        print(f"| {r['dtype']} | {' | '.join(cells)} | {r['logits_rel_err']:.1e} | {same} |")
    print()
    print("replaced:", results[0]["replaced"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
