"""The ``pyformer`` command line (click's CliRunner): check, bench and info.

Everything runs on tiny sizes (``--quick``, one op or dtype) so the file stays fast on 2 cores.
"""

import csv
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

import pyformer.functional
import pyformer.reference
from pyformer.cli import main
from pyformer.cli import cases as case_registry
from pyformer.cli.benchcases import OPS, SWEEPS, parse_sizes
from pyformer.cli.check import run_case
from pyformer.cli.common import cuda_unavailable_reason
from pyformer.testing import compare

FINAL = re.compile(r"^(\d+) passed, (\d+) failed$")


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def table_rows(stdout):
    """The result rows of a check table (lines ending in PASS, FAIL or SKIP)."""
    return [l for l in stdout.splitlines() if re.search(r"\s(PASS|FAIL|SKIP)$", l)]


def final_counts(stdout):
    m = FINAL.match(stdout.strip().splitlines()[-1])
    assert m, f"last line is not 'N passed, M failed': {stdout.strip().splitlines()[-1]!r}"
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- top level / info


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("check", "bench", "info"):
        assert cmd in res.stdout


def test_info(tmp_path):
    path = tmp_path / "info.json"
    res = invoke("info", "--json", str(path))
    assert res.exit_code == 0, res.output
    assert torch.__version__ in res.stdout
    assert pyformer.__version__ in res.stdout
    for label in ("backends compiled in", "CUDA archs compiled for", "GPU"):
        assert label in res.stdout
    data = json.loads(path.read_text())
    assert data["torch"] == torch.__version__
    assert data["backends"]["cpu"] is True


# ----------------------------------------------------------------------------- check


def test_check_passes_with_table_and_json(tmp_path):
    path = tmp_path / "check.json"
    res = invoke(
        "check",
        "--device",
        "cpu",
        "--quick",
        "--op",
        "layer_norm",
        "--op",
        "masked_softmax",
        "--dtype",
        "float32",
        "--dtype",
        "bfloat16",
        "--seed",
        "3",
        "--json",
        str(path),
    )
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert header[:5] == ["op", "device", "dtype", "shape", "mask"]
    assert header[-2:] == ["bound", "result"]
    rows = table_rows(res.stdout)
    assert rows and all(r.endswith("PASS") for r in rows)
    assert {r.split()[0] for r in rows} == {"layer_norm", "masked_softmax"}
    assert {r.split()[2] for r in rows} == {"float32", "bfloat16"}
    # every mask kind of the quick matrix shows up, the fully masked one included
    assert any("fully masked rows" in r for r in rows)
    assert final_counts(res.stdout) == (len(rows), 0)

    data = json.loads(path.read_text())
    assert data["passed"] == len(rows) and data["failed"] == 0 and data["seed"] == 3
    first = data["results"][0]
    for key in (
        "op",
        "device",
        "dtype",
        "shape",
        "mask",
        "fwd_err",
        "grad_err",
        "bound",
        "status",
        "errors",
    ):
        assert key in first
    assert all(r["status"] == "PASS" for r in data["results"])
    # every gradient is compared: layer norm's dx, dweight, dbias
    ln = next(r for r in data["results"] if r["op"] == "layer_norm" and r["mask"] == "weight+bias")
    assert {"y", "dx", "dweight", "dbias"} <= set(ln["errors"])


def test_check_reports_a_disagreeing_op(monkeypatch, tmp_path):
    def off_by_one_percent(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        y = pyformer.reference.layer_norm(x, normalized_shape, weight, bias, eps) * 1.01
        return y

    monkeypatch.setattr(pyformer.functional, "layer_norm", off_by_one_percent)
    path = tmp_path / "check.json"
    res = invoke(
        "check",
        "--device",
        "cpu",
        "--quick",
        "--op",
        "layer_norm",
        "--dtype",
        "float32",
        "--json",
        str(path),
    )
    assert res.exit_code == 1, res.output
    rows = table_rows(res.stdout)
    assert rows and all(r.endswith("FAIL") for r in rows)
    assert "mismatch (first at [(0, 0" in res.stdout
    assert "NaN 0 (ref 0), inf 0 (ref 0)" in res.stdout
    assert final_counts(res.stdout) == (0, len(rows))
    assert json.loads(path.read_text())["failed"] == len(rows)


def test_bench_flags_a_disagreeing_op(monkeypatch, tmp_path):
    def off_by_one_percent(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        return pyformer.reference.layer_norm(x, normalized_shape, weight, bias, eps) * 1.01

    monkeypatch.setattr(pyformer.functional, "layer_norm", off_by_one_percent)
    j = tmp_path / "b.json"
    res = invoke(
        *("bench", "--device", "cpu", "--quick", "--sizes", "32", "--op", "layer_norm"),
        *("--mode", "forward", "--dtype", "float32", "--json", str(j)),
    )
    assert res.exit_code == 0, res.output
    assert "pyformer's forward differs from the float64 reference by 1.0e-02" in res.output
    (row,) = json.loads(j.read_text())["rows"]
    assert row["fwd_err"] > row["fwd_tol"]


def test_check_counts_nan(monkeypatch):
    def with_nan(scores, mask=None, *, scale=1.0, causal=False, key_lengths=None):
        y = pyformer.reference.masked_softmax(
            scores, mask, scale=scale, causal=causal, key_lengths=key_lengths
        )
        return y.clone().index_put_(
            (torch.tensor([0]),) * 4, torch.tensor(float("nan"), dtype=y.dtype)
        )

    monkeypatch.setattr(pyformer.functional, "masked_softmax", with_nan)
    res = invoke(
        "check", "--device", "cpu", "--quick", "--op", "masked_softmax", "--dtype", "float64"
    )
    assert res.exit_code == 1
    assert "probs: rel err inf" in res.stdout
    assert "(first at [(0, 0, 0, 0)" in res.stdout and "NaN 1 (ref 0)" in res.stdout


def test_check_skips_a_dtype_the_op_rejects(monkeypatch):
    real = pyformer.functional.scaled_qk

    def no_half(q, k, scale=None):
        if q.dtype == torch.float16:
            raise RuntimeError("pyformer.scaled_qk: dtype Half is not supported on CPU")
        return real(q, k, scale)

    monkeypatch.setattr(pyformer.functional, "scaled_qk", no_half)
    res = invoke(
        "check",
        "--device",
        "cpu",
        "--quick",
        "--op",
        "scaled_qk",
        "--dtype",
        "float16",
        "--dtype",
        "float32",
    )
    assert res.exit_code == 0, res.output
    assert "SKIP" in res.stdout and "float16 not supported on cpu" in res.stdout
    passed, failed = final_counts(res.stdout)
    assert failed == 0 and passed == len([r for r in table_rows(res.stdout) if "PASS" in r])
    assert "skipped" in res.stdout


def test_check_reports_an_op_that_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something went wrong")

    monkeypatch.setattr(pyformer.functional, "add_layer_norm", broken)
    res = invoke(
        "check", "--device", "cpu", "--quick", "--op", "add_layer_norm", "--dtype", "float32"
    )
    assert res.exit_code == 1
    assert "raised RuntimeError: something went wrong" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--op", "softmax"],
        ["check", "--dtype", "float8"],
        ["check", "--device", "tpu"],
        ["bench", "--op", "nope"],
        ["bench", "--sizes", "big"],
        ["bench", "--mode", "sideways"],
        ["bench", "--sizes", "cpu-targets", "--op", "scaled_qk"],
    ],
)
def test_usage_errors_exit_2(args):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert "Usage:" in res.output or "Error" in res.output


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="CUDA is available here")
@pytest.mark.parametrize("cmd", ["check", "bench"])
def test_missing_cuda_exits_3(cmd):
    res = invoke(cmd, "--device", "cuda", "--quick")
    assert res.exit_code == 3, res.output
    assert "--device cuda was requested but is not available" in res.output


def test_registry_accepts_new_cases():
    case = case_registry.CheckCase(
        op="double",
        shape="(3,5)",
        mask="-",
        make_inputs=lambda g: {"x": torch.randn(3, 5, generator=g, dtype=torch.float64)},
        impl=lambda x: x * 2,
        ref=lambda x: x + x,
        outputs=("y",),
        quick=True,
    )
    case_registry.register("double")(lambda quick: iter([case]))
    try:
        assert "double" in case_registry.op_names()
        assert case_registry.cases(["double"], quick=True) == [case]
        res = run_case(case, "cpu", torch.float32, seed=0)
        assert res.status == "PASS" and set(res.errors) == {"y", "dx"}
    finally:
        case_registry._BUILDERS.pop("double")


def test_quick_matrix_covers_every_op_and_mask_kind():
    quick = case_registry.cases(quick=True)
    assert {c.op for c in quick} == set(OPS) | {"nn.MultiheadAttention", "nn.LayerNorm"}
    masks = {c.mask for c in quick if c.op == "attention"}
    assert set(case_registry.MASK_KINDS) <= masks


# ----------------------------------------------------------------------------- accuracy helpers


def test_compare_applies_the_shared_criteria():
    ref = {
        "y": torch.tensor([3.0, 4.0], dtype=torch.float64),
        "dx": torch.tensor([1.0, 1.0], dtype=torch.float64),
    }
    worst, errors, torch_errors, failures = compare(
        {"y": torch.tensor([3.0, 4.0]), "dx": torch.tensor([1.0, 2.0])}, ref, None, torch.float32
    )
    assert errors["y"] == 0.0 and worst == errors["dx"] > 0.5 and not torch_errors
    assert len(failures) == 1 and failures[0].startswith("dx: rel err")
    # a missing gradient fails
    _, _, _, failures = compare({"y": ref["y"]}, ref, None, torch.float64)
    assert failures == ["dx: missing (the op returned no value or gradient for it)"]
    # half types: at most twice the composition's own error (+1e-5), even under the dtype bound
    out = {"y": torch.tensor([3.0, 4.05]).bfloat16()}  # 4.0625 in bfloat16
    comp = {"y": torch.tensor([3.0, 4.0]).bfloat16()}
    _, errors, torch_errors, failures = compare(out, {"y": ref["y"]}, comp, torch.bfloat16)
    assert torch_errors["y"] == 0.0 and errors["y"] < 1.6e-2 and len(failures) == 1


def test_rel_err_rules_and_chunks():
    """rel_err against the formula computed directly, for every chunk size (it works a chunk at
    a time, on the tensors' device), and its NaN/inf rules."""
    from pyformer.testing import rel_err

    nan, inf = float("nan"), float("inf")
    r = torch.randn(1000, dtype=torch.float64)
    o = r + 1e-3 * torch.randn(1000, dtype=torch.float64)
    a, b = torch.randn(6, 4).t(), torch.randn(4, 6)
    cases = [
        (o, r, ((o - r).norm() / r.norm()).item()),
        (torch.zeros(5), torch.zeros(5), 0.0),
        (torch.ones(5), torch.zeros(5), 5**0.5),
        (torch.tensor([1.0, nan, 2.0]), torch.tensor([1.0, nan, 2.5]), 0.5 / (1 + 2.5**2) ** 0.5),
        (torch.tensor([1.0, inf]), torch.tensor([1.0, inf]), 0.0),
        (torch.tensor([1.0, nan]), torch.tensor([1.0, 1.0]), inf),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, inf]), inf),
        (torch.tensor([1.0, -inf]), torch.tensor([1.0, inf]), inf),
        (torch.tensor([1.0, nan]), torch.tensor([1.0, inf]), inf),
        (torch.ones(2, 3), torch.ones(3, 2), inf),
        (a, b, ((a.double() - b.double()).norm() / b.double().norm()).item()),
        (torch.empty(0), torch.empty(0), 0.0),
    ]
    for out, ref, want in cases:
        for chunk in (1, 3, 1 << 24):
            got = rel_err(out, ref, chunk)
            assert got == want if math.isinf(want) else got == pytest.approx(want, rel=1e-12), (
                out,
                ref,
                chunk,
                got,
                want,
            )


# ----------------------------------------------------------------------------- bench


def test_bench_quick_writes_json_csv_and_plot(tmp_path):
    j, c, p = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    args = [
        "bench",
        "--device",
        "cpu",
        "--quick",
        "--sizes",
        "32",
        "--op",
        "layer_norm",
        "--op",
        "attention",
        "--mode",
        "forward",
        "--json",
        str(j),
        "--csv",
        str(c),
    ]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(p)]
    except ImportError:
        p = None
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "copy bandwidth:" in out and "matmul rate:" in out
    assert "pyformer ms [p20-p80]" in out and "vs textbook" in out
    rows = [l for l in out.splitlines() if l.startswith(("layer_norm ", "attention "))]
    assert len(rows) == 2 and all(" forward " in r for r in rows)
    assert "GB/s" in rows[0] and "TFLOP/s" in rows[1]

    data = json.loads(j.read_text())
    assert data["devices"][0]["copy_gb_per_s"] > 0
    by_op = {r["op"]: r for r in data["rows"]}
    assert set(by_op) == {"layer_norm", "attention"}
    for r in by_op.values():
        assert set(r["timings"]) == {"pyformer", "textbook", "torch"}
        t = r["timings"]["pyformer"]
        assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
        assert r["speedup"]["textbook"] > 0
    for r in by_op.values():  # judged against the float64 reference
        assert 0 <= r["fwd_err"] <= r["fwd_tol"] <= 1e-5

    lines = list(csv.DictReader(c.open()))
    assert len(lines) == 6  # 2 configs x 3 providers
    assert {l["provider"] for l in lines} == {"pyformer", "textbook", "F.layer_norm", "F.sdpa"}
    assert all(l["torch"] == torch.__version__ and l["timestamp"] for l in lines)
    if p is not None:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --csv appends, with one header
    threads = torch.get_num_threads()
    res = invoke(
        "bench",
        "--device",
        "cpu",
        "--quick",
        "--sizes",
        "32",
        "--op",
        "layer_norm",
        "--mode",
        "backward",
        "--threads",
        "1",
        "--csv",
        str(c),
    )
    assert res.exit_code == 0, res.output
    assert "(1 thread)" in res.stdout and torch.get_num_threads() == threads
    text = c.read_text()
    assert text.count("timestamp,") == 1 and len(list(csv.DictReader(c.open()))) == 9


def test_bench_plot_needs_matplotlib(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke("bench", "--device", "cpu", "--quick", "--plot", str(tmp_path / "x.png"))
    assert res.exit_code == 2
    assert "--plot needs matplotlib" in res.output


def test_cpu_targets_sweep_is_exactly_the_cpu_speed_targets():
    sweep = parse_sizes("cpu-targets", quick=False, device="cpu")
    assert sweep is SWEEPS["cpu-targets"] and sweep.modes == ("forward",)
    assert sweep.dtypes == ("float32",)
    got = {(c.op, c.shape, c.variant) for c in sweep.configs("cpu", OPS)}
    assert got == {
        ("masked_softmax", "(8,12,512,512)", "bool (B,1,1,Lk), scale 0.125"),
        ("layer_norm", "(8192,1024)", "weight+bias"),
        ("attention", "q,k,v(8,12,512,64)", "key_lengths in [L/2,L]"),
    }
    # and the CPU default sweep contains all three
    default = {
        (c.op, c.shape, c.variant) for c in parse_sizes(None, False, "cpu").configs("cpu", OPS)
    }
    assert got <= default


def test_gpu_targets_sweep_is_exactly_the_gpu_speed_targets():
    sweep = parse_sizes("gpu-targets", quick=False, device="cuda")
    assert sweep is SWEEPS["gpu-targets"] and sweep.dtypes == ("bfloat16", "float16")
    got = {(c.op, c.shape, c.variant, c.modes) for c in sweep.configs("cuda", OPS)}
    assert got == {
        ("masked_softmax", "(8,16,2048,2048)", "bool (B,1,1,Lk), scale 0.125", ("forward",)),
        ("layer_norm", "(32768,4096)", "weight+bias", ("forward", "backward")),
        ("attention", "q,k,v(8,16,1024,64)", "key_lengths in [L/2,L]", ("both",)),
        ("attention", "q,k,v(8,16,1024,64)", "bool (B,1,1,Lk) in [L/2,L]", ("both",)),
    }
    labels = {t.label() for t in sweep.targets}
    assert labels == {
        "masked_softmax forward: >= 85% copy",
        "masked_softmax forward: >= 2.5x textbook",
        "layer_norm forward: >= 85% copy",
        "layer_norm forward: >= 1.2x torch op",
        "layer_norm backward: >= 1x torch op",
        "attention both: >= 2x textbook",
    }
    assert [c.op for c in sweep.configs("cuda", ("attention",))] == ["attention", "attention"]


def test_targets_judge_the_measured_rows():
    from pyformer.cli.bench import BenchRow
    from pyformer.cli.benchcases import Target, check_targets

    def row(op, mode, gbps, copy, textbook):
        r = BenchRow("cuda", "gpu", op, "v", "(2,2)", 2, "bfloat16", mode, "-")
        r.gbps = {"pyformer": gbps}
        r.copy_gbps = copy
        r.speedup = {"textbook": textbook}
        return r

    rows = [
        row("masked_softmax", "forward", 900.0, 1000.0, 3.0),
        row("masked_softmax", "backward", 100.0, 1000.0, 1.0),
        row("layer_norm", "forward", 800.0, 1000.0, 1.0),
    ]
    targets = [
        Target("masked_softmax", "forward", "copy", 85.0),
        Target("masked_softmax", "forward", "textbook", 3.5),
        Target("layer_norm", "forward", "copy", 85.0),
        Target("layer_norm", "forward", "torch", 1.2),  # no torch timing: not met
        Target("attention", "both", "textbook", 2.0),
    ]  # not run: no verdict
    got = [(v["target"], v["value"], v["met"]) for v in check_targets(targets, rows)]
    assert got == [
        ("masked_softmax forward: >= 85% copy", 90.0, True),
        ("masked_softmax forward: >= 3.5x textbook", 3.0, False),
        ("layer_norm forward: >= 85% copy", 80.0, False),
        ("layer_norm forward: >= 1.2x torch op", None, False),
    ]


def test_bench_cpu_targets_sweep_prints_its_targets(tmp_path):
    j = tmp_path / "b.json"
    res = invoke(
        "bench",
        "--device",
        "cpu",
        "--quick",
        "--sizes",
        "cpu-targets",
        "--op",
        "masked_softmax",
        "--json",
        str(j),
    )
    assert res.exit_code == 0, res.output
    assert "targets of sweep 'cpu-targets':" in res.stdout
    assert "masked_softmax forward: >= 2x textbook" in res.stdout
    data = json.loads(j.read_text())
    rows = data["rows"]
    assert [(r["op"], r["dtype"], r["mode"]) for r in rows] == [
        ("masked_softmax", "float32", "forward")
    ]
    (verdict,) = data["devices"][0]["targets"]
    assert verdict["value"] == pytest.approx(rows[0]["speedup"]["textbook"])
    assert verdict["met"] == (verdict["value"] >= 2.0)


def test_every_bench_op_has_sweep_configs():
    from pyformer.cli.benchcases import SWEEP_CONFIGS

    assert set(SWEEP_CONFIGS) == set(OPS)
    for sweep in ("quick", "cpu", "gpu"):
        ops = {c.op for c in parse_sizes(sweep, quick=False, device="cpu").configs("cpu", OPS)}
        assert ops == set(OPS)


def test_bench_configs_of_an_unknown_op_raise():
    with pytest.raises(ValueError, match="no configs for op 'no_such_op'"):
        parse_sizes("quick", quick=True, device="cpu").configs("cpu", ["no_such_op"])
