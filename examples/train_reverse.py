#!/usr/bin/env python
"""Train the textbook Transformer (pyformer.models.Transformer) to reverse token sequences, on CPU.

Reversal needs attention: output token t is source token L-1-t, a position that depends on the
length of each sequence, so the decoder has to look it up in the encoder output. A trained model's
cross-attention shows the reversal as an anti-diagonal.

What the script does:
1. generates a held-out set of source sequences and trains on freshly generated batches that never
   contain a held-out sequence;
2. trains with pyformer's kernels (``backend="pyformer"``), with a progress bar;
3. (``--compare``, on by default) trains the same model again, from the same seed and the same
   initial weights on the same batches, with the pure-PyTorch reference backend, and compares the
   two loss curves;
4. decodes the held-out set greedily and reports the exact-match accuracy;
5. writes ``loss.png``, ``attention.png`` (a held-out sequence's cross-attention),
   ``report.json`` and ``report.txt`` into ``--out``: by default ``examples/results/`` for the
   full run (the committed results) and a folder under the system's temporary directory for a
   ``--quick`` smoke run, which never writes into ``examples/results/``.

    python examples/train_reverse.py           # the full run (a few minutes, 2 cores)
    python examples/train_reverse.py --quick   # a short smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as TF

PAD, SOS, EOS = 0, 1, 2
FIRST_TOKEN = 3


# ---------------------------------------------------------------------------------------- data


class ReverseTask:
    """Random token sequences and their reversals, padded on the right with PAD.

    Tokens are ``FIRST_TOKEN .. vocab-1``; lengths uniform in ``[min_len, max_len]``.
    ``src`` (B, max_len); decoder input ``[SOS] + reversed`` and target ``reversed + [EOS]``,
    both (B, max_len + 1).
    """

    def __init__(self, vocab: int, min_len: int, max_len: int):
        self.vocab, self.min_len, self.max_len = vocab, min_len, max_len
        self.held_out: set = set()

    def sample(self, n: int, gen: torch.Generator, exclude_held_out: bool = True) -> List[tuple]:
        seqs: List[tuple] = []
        while len(seqs) < n:
            lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=gen)
            toks = torch.randint(FIRST_TOKEN, self.vocab, (n, self.max_len), generator=gen)
            for length, row in zip(lengths.tolist(), toks.tolist()):
                s = tuple(row[:length])
                if exclude_held_out and s in self.held_out:
                    continue
                seqs.append(s)
                if len(seqs) == n:
                    break
        return seqs

    def tensors(self, seqs: Sequence[tuple]):
        b, m = len(seqs), self.max_len
        src = torch.full((b, m), PAD, dtype=torch.long)
        trg_in = torch.full((b, m + 1), PAD, dtype=torch.long)
        trg_out = torch.full((b, m + 1), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            r = list(reversed(s))
            src[i, : len(s)] = torch.tensor(s)
            trg_in[i, : len(s) + 1] = torch.tensor([SOS] + r)
            trg_out[i, : len(s) + 1] = torch.tensor(r + [EOS])
        return src, trg_in, trg_out


# ---------------------------------------------------------------------------------------- model


def build_model(args, backend: str):
    from pyformer.models import Transformer

    return Transformer(
        src_pad_idx=PAD,
        trg_pad_idx=PAD,
        enc_voc_size=args.vocab,
        dec_voc_size=args.vocab,
        d_model=args.d_model,
        n_head=args.heads,
        max_len=args.max_len + 2,
        ffn_hidden=args.ffn,
        n_layers=args.layers,
        drop_prob=args.dropout,
        backend=backend,
    )


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def greedy_decode(model, src: torch.Tensor, max_out: int) -> torch.Tensor:
    """Greedy decoding: (B, S) source ids -> (B, <= max_out) output ids (EOS/PAD after the end)."""
    model.eval()
    enc, src_mask = model.encode(src)
    out = torch.full((src.shape[0], 1), SOS, dtype=torch.long)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    for _ in range(max_out):
        logits = model.decode(out, enc, src_mask)[:, -1]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return out[:, 1:]


def exact_match(pred: torch.Tensor, seqs: Sequence[tuple]) -> float:
    ok = 0
    for row, s in zip(pred.tolist(), seqs):
        want = list(reversed(s)) + [EOS]
        ok += row[: len(want)] == want
    return ok / len(seqs)


def train(
    model,
    task: ReverseTask,
    args,
    label: str,
    progress: bool = True,
    max_steps: Optional[int] = None,
) -> Dict[str, list]:
    """Train ``model`` on batches drawn from ``args.seed``; the losses per step.

    The schedule is that of ``args.steps`` steps; ``max_steps`` stops early (for the rerun check).
    """
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 2)  # dropout masks: the same stream for every backend
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    losses: List[float] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=args.steps,
                desc=f"train [{label}]",
                ncols=90,
                mininterval=0.5,
                file=sys.stdout,
            )
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps if max_steps is None else min(max_steps, args.steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        src, trg_in, trg_out = task.tensors(task.sample(args.batch_size, gen))
        logits = model(src, trg_in)
        loss = TF.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), trg_out.reshape(-1), ignore_index=PAD
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        elif progress and (step % max(1, args.steps // 20) == 0 or step == args.steps - 1):
            print(f"[{label}] step {step + 1}/{args.steps} loss {losses[-1]:.4f}", flush=True)
    if bar is not None:
        bar.close()
    return {"loss": losses, "seconds": time.perf_counter() - t0}


def compare_curves(a: Sequence[float], b: Sequence[float], early: int) -> Dict[str, float]:
    diff = [abs(x - y) for x, y in zip(a, b)]
    rel = [d / max(abs(y), 1e-12) for d, y in zip(diff, b)]
    n = len(diff)
    win = max(1, n // 10)  # window means: the curve's shape rather than single noisy steps
    wa = [sum(a[i : i + win]) / len(a[i : i + win]) for i in range(0, n, win)]
    wb = [sum(b[i : i + win]) / len(b[i : i + win]) for i in range(0, n, win)]
    wrel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(wa, wb)]
    # the sampling noise of a window mean: batch-to-batch spread of the loss in the last window
    last = b[-win:]
    mean = sum(last) / len(last)
    std = (sum((x - mean) ** 2 for x in last) / max(1, len(last) - 1)) ** 0.5
    noise = std / max(mean, 1e-12) / math.sqrt(len(last))
    first_1e3 = next((i + 1 for i, r in enumerate(rel) if r > 1e-3), None)
    return {
        "early_steps": min(early, n),
        "max_abs_diff_early": max(diff[:early]) if n else 0.0,
        "max_rel_diff_early": max(rel[:early]) if n else 0.0,
        "max_abs_diff": max(diff) if n else 0.0,
        "max_rel_diff": max(rel) if n else 0.0,
        "window": win,
        "max_rel_diff_window_means": max(wrel) if n else 0.0,
        "final_window_mean_pyformer": wa[-1] if n else 0.0,
        "final_window_mean_reference": wb[-1] if n else 0.0,
        "window_mean_noise_rel": noise,
        "first_step_rel_diff_above_1e-3": first_1e3,
    }


# ---------------------------------------------------------------------------------------- main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the full run's
QUICK_OUT = os.path.join(tempfile.gettempdir(), "pyformer_train_reverse_quick")  # --quick's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=13, help="incl. PAD, SOS, EOS (ids 0, 1, 2)")
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=10)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: leave as is); this model is small enough that one "
        "thread is fastest, and on a shared machine much faster",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"where the files go; default: {RESULTS} (the committed results) for a "
        f"full run, {QUICK_OUT} for --quick",
    )
    p.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the second run with the pure-PyTorch reference backend",
    )
    p.add_argument(
        "--early",
        type=int,
        default=50,
        help="steps over which the two loss curves must agree tightly",
    )
    p.add_argument(
        "--early-tol",
        type=float,
        default=1e-4,
        help="max relative loss difference allowed over the first --early steps",
    )
    p.add_argument(
        "--curve-tol",
        type=float,
        default=0.05,
        help="max relative difference allowed between window means of the curves",
    )
    p.add_argument(
        "--target",
        type=float,
        default=0.95,
        help="held-out exact match the run must reach (exit status 1 otherwise)",
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (for the tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else RESULTS
    if args.quick and os.path.realpath(args.out) == os.path.realpath(RESULTS):
        p.error(
            f"--quick is a smoke run and does not write over the committed results in "
            f"{RESULTS}: give another --out"
        )
    if args.quick:
        args.steps, args.eval_size, args.warmup = min(args.steps, 30), min(args.eval_size, 64), 10
        args.early = min(args.early, 10)
        args.target = 0.0
    return args


TOLERANCE_NOTE = (
    "Both runs start from the same seed and the same initial weights and see the same batches and "
    "dropout masks, and a run is deterministic (the script reruns the pyformer backend over the "
    "first --early steps and checks that it reproduces its curve bit for bit), so the two curves "
    "differ only by how the two backends round in float32. pyformer's kernels and the "
    "pure-PyTorch composition each agree with float64 to well within docs/ops.md's 1e-5 relative, so "
    "while the weights are still the same the losses must agree to --early-tol = 1e-4 relative over "
    "the first --early = 50 steps (10x docs/ops.md's per-op bound, for a loss that composes some 30 ops "
    "and their gradients). Training is chaotic, though: every step feeds the rounding difference "
    "of the last into the weights and Adam's normalized updates amplify it, so single-step losses "
    "decorrelate after some hundreds of steps (the report gives the first step where they differ "
    "by more than 1e-3) and only the curve's shape stays comparable. Over the whole run we compare "
    "means over windows of a tenth of the run: two decorrelated curves of the same shape differ "
    "there by about sqrt(2) times the sampling noise of a window mean (batch-to-batch spread / "
    "sqrt(window), given in the report), a few percent here, so --curve-tol = 5% relative; and "
    "both runs must reach the accuracy target."
)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    task = ReverseTask(args.vocab, args.min_len, args.max_len)
    eval_gen = torch.Generator().manual_seed(args.seed + 1000)
    held = []
    seen = set()
    while len(held) < args.eval_size:
        for s in task.sample(args.eval_size, eval_gen, exclude_held_out=False):
            if s not in seen and len(held) < args.eval_size:
                seen.add(s)
                held.append(s)
    task.held_out = seen

    torch.manual_seed(args.seed)
    model = build_model(args, "pyformer")
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"pyformer.models.Transformer: {n_params} parameters; reversing sequences of "
        f"{args.min_len}-{args.max_len} tokens from a vocabulary of {args.vocab - FIRST_TOKEN}; "
        f"{args.steps} steps of {args.batch_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    runs = {"pyformer": train(model, task, args, "pyformer", args.progress)}
    src_eval, _, _ = task.tensors(held)
    t0 = time.perf_counter()
    pred = greedy_decode(model, src_eval, args.max_len + 1)
    acc = exact_match(pred, held)
    decode_s = time.perf_counter() - t0
    print(f"held-out exact match (pyformer): {acc:.4f} ({len(held)} sequences)", flush=True)

    ref_acc = None
    curves = None
    if args.compare:
        ref = build_model(args, "reference")
        ref.load_state_dict(init_state)
        runs["reference"] = train(ref, task, args, "reference", args.progress)
        ref_acc = exact_match(greedy_decode(ref, src_eval, args.max_len + 1), held)
        print(f"held-out exact match (reference): {ref_acc:.4f}", flush=True)
        curves = compare_curves(runs["pyformer"]["loss"], runs["reference"]["loss"], args.early)
        rerun = build_model(args, "pyformer")
        rerun.load_state_dict(init_state)
        again = train(rerun, task, args, "pyformer rerun", False, max_steps=args.early)["loss"]
        curves["rerun_bitwise_identical"] = again == runs["pyformer"]["loss"][: len(again)]
        curves["rerun_ok"] = curves["rerun_bitwise_identical"]
        curves["early_ok"] = curves["max_rel_diff_early"] <= args.early_tol
        curves["curve_ok"] = curves["max_rel_diff_window_means"] <= args.curve_tol
        print(
            f"loss curves: first {curves['early_steps']} steps max rel diff "
            f"{curves['max_rel_diff_early']:.2e} (tol {args.early_tol:g}); window means max rel "
            f"diff {curves['max_rel_diff_window_means']:.2e} (tol {args.curve_tol:g}); rerun "
            f"reproducible: {curves['rerun_ok']}",
            flush=True,
        )

    # attention map of a held-out sequence: the last decoder layer's cross-attention
    example = max(held[:50], key=len)
    src1, _, _ = task.tensors([example])
    out1 = greedy_decode(model, src1, args.max_len + 1)[0].tolist()
    out_tokens = out1[: out1.index(EOS) + 1] if EOS in out1 else out1
    trg1 = torch.tensor([[SOS] + out_tokens[:-1]])
    model.eval()
    with torch.no_grad():
        _, maps = model(src1[:, : len(example)], trg1, return_attention=True)
    last = f"decoder.layers.{args.layers - 1}.enc_dec_attention"
    cross = maps[last][0].mean(0)  # (T, S), heads averaged

    def name(t):
        return {PAD: "<pad>", SOS: "<sos>", EOS: "<eos>"}.get(t, str(t - FIRST_TOKEN))

    key_labels = [name(t) for t in example]
    query_labels = [name(t) for t in out_tokens]
    # anti-diagonal mass: output position t attending source position L-1-t
    length = len(example)
    anti = [float(cross[t, length - 1 - t]) for t in range(min(length, cross.shape[0]))]
    anti_mean = sum(anti) / max(1, len(anti))

    files = {}
    try:
        from pyformer import viz

        files["attention_png"] = viz.attention_heatmap(
            cross,
            key_labels,
            query_labels,
            os.path.join(args.out, "attention.png"),
            title=f"{last} (heads averaged)\nheld-out sequence, output = reversed source",
            annotate=True,
            xlabel="source token (key)",
            ylabel="output token predicted at this step (query)",
        )
        curves_plot = {
            f"pyformer (final {runs['pyformer']['loss'][-1]:.4f})": runs["pyformer"]["loss"]
        }
        extra = None
        if "reference" in runs:
            curves_plot[f"reference (final {runs['reference']['loss'][-1]:.4f})"] = runs[
                "reference"
            ]["loss"]
            extra = {
                "|loss_pyformer - loss_reference| / loss_reference": [
                    max(abs(a - b) / max(abs(b), 1e-12), 1e-12)
                    for a, b in zip(runs["pyformer"]["loss"], runs["reference"]["loss"])
                ]
            }
        files["loss_png"] = viz.loss_plot(
            curves_plot,
            os.path.join(args.out, "loss.png"),
            title=f"reverse task: cross-entropy per step (held-out exact match {acc:.1%})",
            extra=extra,
            extra_label="relative difference",
        )
    except ImportError as e:
        print(f"plots skipped: {e}", flush=True)

    report = {
        "task": "reverse token sequences",
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "parameters": n_params,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "held_out_sequences": len(held),
        "exact_match": acc,
        "exact_match_reference": ref_acc,
        "target": args.target,
        "train_seconds": {k: round(r["seconds"], 2) for k, r in runs.items()},
        "decode_seconds": round(decode_s, 2),
        "final_loss": {k: r["loss"][-1] for k, r in runs.items()},
        "loss_curves": {k: r["loss"] for k, r in runs.items()},
        "curve_comparison": curves,
        "tolerance_justification": TOLERANCE_NOTE if args.compare else None,
        "attention_example": {
            "source": key_labels,
            "output": query_labels,
            "module": last,
            "anti_diagonal_mean_weight": anti_mean,
        },
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    lines = [
        "pyformer example: the textbook Transformer learns to reverse sequences",
        f"  model: {n_params} parameters (d_model {args.d_model}, {args.heads} heads, "
        f"{args.layers}+{args.layers} layers, ffn {args.ffn}, dropout {args.dropout})",
        f"  training: {args.steps} steps x {args.batch_size} sequences of {args.min_len}-"
        f"{args.max_len} tokens; "
        + ", ".join(f"{k} {r['seconds']:.1f} s" for k, r in runs.items()),
        f"  held-out exact match: {acc:.2%} (pyformer)"
        + (f", {ref_acc:.2%} (reference)" if ref_acc is not None else "")
        + f" on {len(held)} sequences never seen in training",
        "  final loss: " + ", ".join(f"{k} {r['loss'][-1]:.5f}" for k, r in runs.items()),
    ]
    if curves:
        lines += [
            f"  loss curves, first {curves['early_steps']} steps: max relative difference "
            f"{curves['max_rel_diff_early']:.2e} (tolerance {args.early_tol:g}): "
            f"{'OK' if curves['early_ok'] else 'FAIL'}",
            f"  loss curves, means over windows of {curves['window']} steps: max relative "
            f"difference {curves['max_rel_diff_window_means']:.2e} (tolerance {args.curve_tol:g}): "
            f"{'OK' if curves['curve_ok'] else 'FAIL'}",
            f"  (window-mean sampling noise {curves['window_mean_noise_rel']:.2e} relative; single "
            f"steps first differ by > 1e-3 at step {curves['first_step_rel_diff_above_1e-3']}; "
            f"largest single-step difference {curves['max_rel_diff']:.2e})",
            f"  determinism: a pyformer rerun reproduces the first {curves['early_steps']} steps"
            f" bit for bit: {'OK' if curves['rerun_ok'] else 'FAIL'}",
        ]
    lines += [
        f"  attention map ({last}, heads averaged) of held-out {' '.join(key_labels)}: "
        f"mean weight on the anti-diagonal {anti_mean:.3f}",
        "  files: " + ", ".join(os.path.basename(v) for v in files.values()) + ", report.json",
    ]
    if args.compare:
        lines += ["", "Tolerance: " + TOLERANCE_NOTE]
    ok = (
        acc >= args.target
        and (ref_acc is None or ref_acc >= args.target)
        and (curves is None or (curves["early_ok"] and curves["curve_ok"] and curves["rerun_ok"]))
    )
    report["ok"] = ok
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines.append(f"  result: {'OK' if ok else 'FAIL'} (target exact match {args.target:.0%})")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(text)
    print(text, flush=True)
    print(f"files written to {args.out}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
