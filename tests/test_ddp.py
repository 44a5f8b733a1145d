"""The textbook Transformer under DistributedDataParallel: 2 processes, gloo, CPU.

Each rank trains on its half of every batch; DDP averages the gradients. After a few steps the
parameters must agree across ranks and with one process training on the whole batches.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyformer.models import Transformer

WORLD = 2
STEPS = 3
BATCH = 8  # per step, split in halves between the ranks


def _model():
    torch.manual_seed(0)
    return Transformer(
        src_pad_idx=0,
        trg_pad_idx=0,
        enc_voc_size=17,
        dec_voc_size=17,
        d_model=32,
        n_head=4,
        max_len=16,
        ffn_hidden=64,
        n_layers=2,
        drop_prob=0.0,
    )


def _data():
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(1, 17, (STEPS, BATCH, 9), generator=gen)
    lengths = torch.randint(3, 10, (STEPS, BATCH), generator=gen)
    src = src.masked_fill(torch.arange(9) >= lengths[..., None], 0)  # padded sources
    trg = torch.randint(1, 17, (STEPS, BATCH, 8), generator=gen)  # no target padding: every
    return src, trg  # rank's loss averages the same number of tokens, as the full batch does


def _train(model, src, trg, rows=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        s, t = src[step, rows], trg[step, rows]
        logits = model(s, t[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        src, trg = _data()
        half = BATCH // WORLD
        _train(ddp, src, trg, slice(rank * half, (rank + 1) * half))
        torch.save(
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    single = _model()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    src, trg = _data()
    _train(single, src, trg)
    ref = single.state_dict()

    moved = 0
    for k in ref:
        torch.testing.assert_close(r0[k], r1[k], rtol=1e-6, atol=1e-7, msg=f"ranks differ: {k}")
        torch.testing.assert_close(
            r0[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"DDP differs from one process: {k}"
        )
        moved += not torch.equal(ref[k], before[k])
    assert moved > len(ref) // 2  # training really changed the parameters
