"""Shared test machinery: devices, and the verification harness of pyformer.testing."""

from __future__ import annotations

import os
import zlib
from collections import Counter

import pytest
import torch

import pyformer
from pyformer.testing import MASK_KINDS, make_mask, verify  # noqa: F401 (tests import them here)

CUDA = pyformer.backends()["cuda_available"]
# the one reason a test that needs a GPU gives for its skip (grouped in the run's last line)
NEEDS_CUDA = f"need a CUDA device ({'pyformer built without CUDA' if torch.cuda.is_available() else 'no GPU here'})"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA))]


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh inputs per test, reproducible from the test's name (crc32: stable across processes);
    # PYFORMER_TEST_SEED=N draws another set everywhere
    base = int(os.environ.get("PYFORMER_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ base)


def next_dropout_seed() -> int:
    """The Philox key the next attention call with dropout draws (the flash op returns it), the
    default generator then put back where it was: what pyformer.reference.attention's
    ``dropout_seed`` takes to drop the same elements."""
    state = torch.get_rng_state()
    x = torch.zeros(1, 1, 1, 1)
    _, _, rng = torch.ops.pyformer.flash_attention(x, x, x, None, None, 0, None, 0.5)
    torch.set_rng_state(state)
    return int(rng.item())


def compare(fast, slow, args, *, dtype, device, grad=(), what=""):
    """Runs `fast` (pyformer) on `args` in `dtype` on `device` and checks every output and every
    gradient (w.r.t. the args whose indices are in `grad`) against `slow` (the reference), by
    pyformer.testing.verify; returns the outputs of both as lists."""
    v = verify(fast, slow, args, dtype=dtype, device=device, grad=grad).assert_ok(what)
    return list(v.outputs.values()), list(v.reference.values())


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each pyformer.functional op made through the nn modules."""
    import pyformer.functional as PF

    counts = {}
    for name in ("attention", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"):
        orig = getattr(PF, name)

        def wrap(*a, __orig=orig, __name=name, **k):
            counts[__name] = counts.get(__name, 0) + 1
            return __orig(*a, **k)

        monkeypatch.setattr(PF, name, wrap)
    return counts


def pytest_terminal_summary(terminalreporter):
    """Ends the run with one line saying what was skipped and why, grouped by reason."""
    reasons = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        why = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reasons[why.removeprefix("Skipped: ")] += 1
    if reasons:
        parts = "; ".join(f"{n} {why}" for why, n in reasons.most_common())
        terminalreporter.write_line(f"{sum(reasons.values())} skipped: {parts}")
