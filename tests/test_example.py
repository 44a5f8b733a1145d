"""A short run of examples/train_reverse.py: trains, compares the backends, writes its files."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "examples", "train_reverse.py")


def _load():
    spec = importlib.util.spec_from_file_location("train_reverse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_reverse_quick(tmp_path):
    ex = _load()
    threads = torch.get_num_threads()
    try:
        report = ex.main(
            [
                "--quick",
                "--steps",
                "12",
                "--batch-size",
                "16",
                "--d-model",
                "32",
                "--ffn",
                "64",
                "--eval-size",
                "24",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    losses = report["loss_curves"]
    assert len(losses["pyformer"]) == len(losses["reference"]) == 12
    assert losses["pyformer"][-1] < losses["pyformer"][0]  # it learns
    cmp = report["curve_comparison"]
    assert cmp["early_ok"] and cmp["curve_ok"] and cmp["rerun_ok"], cmp
    assert report["ok"]
    assert cmp["max_rel_diff_early"] <= 1e-4
    assert 0.0 <= report["exact_match"] <= 1.0
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["exact_match"] == report["exact_match"]
    assert (tmp_path / "report.txt").read_text().startswith("pyformer example")
    att = report["attention_example"]
    assert len(att["source"]) >= 3 and att["module"].endswith("enc_dec_attention")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: no plots")
    for name in ("loss.png", "attention.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_only_a_full_run_writes_the_committed_results():
    ex = _load()
    results = os.path.realpath(os.path.join(HERE, "..", "examples", "results"))
    assert os.path.realpath(ex.parse_args([]).out) == results
    quick = os.path.realpath(ex.parse_args(["--quick"]).out)
    repo = os.path.realpath(os.path.join(HERE, ".."))
    assert os.path.commonpath([quick, repo]) != repo  # outside the repository
    with pytest.raises(SystemExit) as exc:
        ex.parse_args(["--quick", "--out", os.path.join(HERE, "..", "examples", "results")])
    assert exc.value.code == 2


def test_task_and_decoding_helpers():
    ex = _load()
    task = ex.ReverseTask(vocab=8, min_len=2, max_len=5)
    gen = torch.Generator().manual_seed(0)
    seqs = task.sample(6, gen)
    src, trg_in, trg_out = task.tensors(seqs)
    for i, s in enumerate(seqs):
        n = len(s)
        assert src[i, :n].tolist() == list(s) and (src[i, n:] == ex.PAD).all()
        assert trg_in[i, : n + 1].tolist() == [ex.SOS] + list(reversed(s))
        assert trg_out[i, : n + 1].tolist() == list(reversed(s)) + [ex.EOS]
    task.held_out = set(seqs)
    assert not set(task.sample(200, torch.Generator().manual_seed(0))) & task.held_out
    pred = torch.tensor([list(reversed(seqs[0])) + [ex.EOS] + [0] * 3])
    assert ex.exact_match(pred, seqs[:1]) == 1.0


def test_viz_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    from pyformer import viz

    w = torch.softmax(torch.randn(4, 6), -1)
    p = viz.attention_heatmap(
        w, list("abcdef"), list("wxyz"), str(tmp_path / "a" / "h.png"), title="t", annotate=True
    )
    assert os.path.getsize(p) > 1000
    fig = viz.attention_heatmap(w.numpy())  # no path: the Figure itself
    assert fig.axes
    p = viz.attention_grid({"h0": w, "h1": w.flip(-1)}, path=str(tmp_path / "g.png"))
    assert os.path.getsize(p) > 1000
    p = viz.loss_plot(
        {"a": [3.0, 2.0, 1.0], "b": [3.0, 2.1, 0.9]},
        str(tmp_path / "l.png"),
        extra={"diff": [1e-12, 0.05, 0.1]},
    )
    assert os.path.getsize(p) > 1000
    with pytest.raises(ValueError, match="2-D"):
        viz.attention_heatmap(torch.rand(2, 3, 4))
