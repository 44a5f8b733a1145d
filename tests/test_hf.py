"""Hugging Face transformers integration: attn_implementation="pyformer" gives eager's outputs.

Small models from configs with random weights; nothing is downloaded. Skipped without
``transformers``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyformer.functional as PF  # noqa: E402
from pyformer.integrations import transformers as pt  # noqa: E402

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def quiet():
    transformers.logging.set_verbosity_error()
    yield


@pytest.fixture
def calls(monkeypatch):
    count = {"attention": 0}
    orig = PF.attention

    def wrap(*a, **k):
        count["attention"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(PF, "attention", wrap)
    return count


def test_register_returns_name():
    assert pt.register() == "pyformer"
    assert pt.register() == "pyformer"  # idempotent
    from transformers import AttentionInterface

    assert "pyformer" in AttentionInterface().valid_keys()
    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        return
    assert "pyformer" in AttentionMaskInterface._global_mapping


def _bert(dtype):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertModel(cfg).to(dtype).eval()


def _gpt2(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def _inputs(b=3, s=11, lengths=(11, 6, 3), left=False):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (b, s), generator=gen)
    mask = (torch.arange(s) < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(-1)
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bert_matches_eager(dtype, calls):
    name = pt.register()
    model = _bert(dtype)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_nopad = model(input_ids=ids).last_hidden_state
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out_nopad = model(input_ids=ids).last_hidden_state
    assert calls["attention"] == 4
    assert rel(out, ref) <= BOUND[dtype]  # padded query rows included
    assert rel(out_nopad, ref_nopad) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpt2_matches_eager(dtype, calls):
    name = pt.register()
    model = _gpt2(dtype)
    ids, mask = _inputs()
    lids, lmask = _inputs(left=True)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_nopad = model(input_ids=ids).logits
        ref_left = model(input_ids=lids, attention_mask=lmask).logits
        model.set_attn_implementation(name)
        out = model(input_ids=ids, attention_mask=mask).logits
        out_nopad = model(input_ids=ids).logits
        out_left = model(input_ids=lids, attention_mask=lmask).logits
    assert calls["attention"] == 6
    assert rel(out, ref) <= BOUND[dtype]  # right padding: causal + padding mask
    assert rel(out_nopad, ref_nopad) <= BOUND[dtype]  # no mask: causal flag
    # left padding: the pad query rows see no key at all (eager averages the values there,
    # pyformer returns zeros as SDPA does); every real token must agree
    keep = lmask.bool()
    assert rel(out_left[keep], ref_left[keep]) <= BOUND[dtype]


def test_gpt2_training_gradients_match(calls):
    name = pt.register()
    model = _gpt2(torch.float64).train()
    ids, mask = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation(name)
    loss2 = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss2.backward()
    assert abs(loss2.item() - loss.item()) <= 1e-12 * abs(loss.item())
    for n, p in model.named_parameters():
        assert rel(p.grad, ref[n]) <= 1e-11, n
    assert calls["attention"] == 2


def test_generate_with_cache_matches_eager():
    name = pt.register()
    model = _gpt2(torch.float64)
    ids, mask = _inputs(b=2, s=5, lengths=(5, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, **kw)
    model.set_attn_implementation(name)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def test_from_pretrained_with_pyformer(tmp_path, calls):
    from transformers import BertModel

    name = pt.register()
    model = _bert(torch.float32)
    model.save_pretrained(tmp_path)
    loaded = BertModel.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    ids, mask = _inputs()
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls["attention"] == 2
    assert rel(out, ref) <= 1e-5


def test_grouped_query_attention_llama(calls):
    from transformers import LlamaConfig, LlamaModel

    name = pt.register()
    cfg = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "sdpa"  # Llama's eager path runs its softmax in float32
    torch.manual_seed(0)
    model = LlamaModel(cfg).double().eval()
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation(name)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls["attention"] == 2
    assert rel(out, ref) <= 1e-12


# ---- right padding as key_lengths ---------------------------------------------------------------


def _allowed_by(lengths, causal, lq, lk):
    """The (B, 1, Lq, Lk) bool mask that key_lengths (and top-left causal) stand for."""
    j = torch.arange(lk)
    ok = j < lengths[:, None, None, None]
    if causal:
        ok = ok & (j <= torch.arange(lq)[:, None])
    return ok.expand(len(lengths), 1, lq, lk)


def _check_detection(mask, batch, lq, lk):
    """Runs the detection; where it converts, the keys it masks must be the mask's, exactly."""
    found = pt._right_padding(mask, batch, lq, lk)
    if found is not None:
        lengths, causal = found
        assert lengths.dtype == torch.int64 and lengths.shape == (batch,)
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            assert bool(((mask == 0) | (mask == float("-inf"))).all())
            allowed = mask == 0
        assert torch.equal(
            allowed.expand(batch, 1, lq, lk), _allowed_by(lengths, causal, lq, lk)
        ), (mask, found)
    return found


@pytest.mark.parametrize("lq, lk", [(2, 2), (3, 3), (2, 3), (3, 2), (1, 4)])
def test_right_padding_detection_exhaustive(lq, lk):
    # every bool mask of one batch element: exactly the right-padding patterns convert
    n = lq * lk
    bits = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1
    converted = set()
    for row in bits:
        mask = row.bool().view(1, 1, lq, lk)
        if _check_detection(mask, 1, lq, lk) is not None:
            converted.add(tuple(row.tolist()))
    want = {
        tuple(_allowed_by(torch.tensor([m]), False, lq, lk).flatten().long().tolist())
        for m in range(lk + 1)
    }
    if lq == lk:
        want |= {
            tuple(_allowed_by(torch.tensor([m]), True, lq, lk).flatten().long().tolist())
            for m in range(lk + 1)
        }
    assert converted == want


def test_right_padding_detection_cases():
    b, l = 3, 7
    lengths = torch.tensor([7, 4, 0])
    pad = _allowed_by(lengths, False, l, l)
    causal = _allowed_by(lengths, True, l, l)
    ninf = float("-inf")

    def conv(mask, lq=l, lk=l, batch=b):
        return _check_detection(mask, batch, lq, lk)

    for mask, want_causal in ((pad, False), (causal, True)):
        lengths_found, c = conv(mask)
        assert torch.equal(lengths_found, lengths) and c == want_causal
        assert conv(mask.clone().transpose(2, 3).contiguous().transpose(2, 3)) is not None
        additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, ninf)
        assert conv(additive) is not None  # 0 / -inf: the same keys masked
        additive[0, 0, 0, 0] = -0.5  # any other value is added to the scores, not masked
        assert conv(additive) is None
        fmin = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        assert conv(fmin) is None  # finite: added, a fully masked row averages
        assert conv(mask.flip(-1)) is None  # left padding
        assert conv(mask.expand(b, 2, l, l)) is None  # a mask per head
        # one key fewer than queries: right padding still, but causal would be bottom-right
        cut = conv(mask[:, :, :, :-1], lk=l - 1)
        assert cut is None if want_causal else torch.equal(cut[0], torch.tensor([6, 4, 0]))
        holed = mask.clone()
        holed[0, 0, -1, 2] = False
        assert conv(holed) is None
    # broadcast: one row for every query (B, 1, 1, Lk), one batch element for all, expand()ed
    assert torch.equal(conv(pad[:, :, :1])[0], lengths)
    assert torch.equal(conv(pad[1:2, :, :1], batch=b)[0], torch.tensor([4, 4, 4]))
    assert torch.equal(conv(pad[:, :, :1].expand(b, 1, l, l))[0], lengths)
    # decoding with a cache: one query, all keys before it (bottom-right causal) and right padding
    assert torch.equal(conv(pad[:, :, -1:], lq=1)[0], lengths)
    # a chunk of Lq < Lk queries, bottom-right causal: not the kernel's top-left causal
    chunk = torch.ones(l, l, dtype=torch.bool).tril()[-3:].expand(b, 1, 3, l)
    assert conv(chunk, lq=3) is None
    # random masks never convert wrongly (they may not convert at all)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        conv(torch.rand(b, 1, l, l, generator=gen) < 0.9)


@pytest.fixture
def recorded(monkeypatch):
    """Every call of pyformer.functional.attention: whether it had a mask, and its key_lengths
    and causal arguments."""
    seen = []
    orig = PF.attention

    def wrap(q, k, v, mask=None, **kw):
        seen.append((mask is not None, kw.get("key_lengths"), kw.get("causal")))
        return orig(q, k, v, mask, **kw)

    monkeypatch.setattr(PF, "attention", wrap)
    return seen


@pytest.mark.parametrize("model", ["bert", "gpt2"])
@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_right_padding_runs_as_key_lengths(model, padding, recorded, monkeypatch):
    name = pt.register()
    m = (_bert if model == "bert" else _gpt2)(torch.float64)
    m.set_attn_implementation(name)
    ids, mask = _inputs(left=padding == "left")
    kw = {"input_ids": ids} if padding == "none" else {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        out = m(**kw)[0]
        converted = list(recorded)
        recorded.clear()
        monkeypatch.setattr(pt, "_right_padding", lambda *a, **k: None)  # always pass the mask
        ref = m(**kw)[0]
        masked = list(recorded)
    assert len(converted) == len(masked) == 2
    if padding == "right":
        for had_mask, lengths, causal in converted:
            assert not had_mask and torch.equal(lengths, torch.tensor([11, 6, 3]))
            assert causal == (model == "gpt2")
        assert all(had_mask and lengths is None for had_mask, lengths, _ in masked)
        # the same keys masked; the kernels then read only the first key_lengths[b] keys, which
        # can round the softmax sums differently in the last bits
        assert rel(out, ref) <= 1e-14
    else:
        assert converted == masked
        assert all(lengths is None for _, lengths, _ in converted)
        assert torch.equal(out, ref)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_forward_float_and_dropout(kind, recorded):
    b, h, l, d = 3, 2, 9, 8
    q, k, v = (torch.randn(b, h, l, d, dtype=torch.float64) for _ in range(3))
    allowed = _allowed_by(torch.tensor([9, 5, 1]), True, l, l)
    additive = torch.zeros(allowed.shape, dtype=torch.float64)
    mask = allowed if kind == "bool" else additive.masked_fill(~allowed, -torch.inf)
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        out, _ = pt.pyformer_attention_forward(_Module(), q, k, v, mask, dropout=p)
        torch.manual_seed(1)
        ref, _ = PF.attention(q, k, v, mask, dropout_p=p)
        assert rel(out, ref.transpose(1, 2)) <= 1e-14  # the same keep mask drawn
    assert recorded[0][0] is False and recorded[0][2] is True
    # finite "masked" values are added to the scores, not masked: the mask goes as is
    fmin = additive.masked_fill(~allowed, torch.finfo(torch.float64).min)
    recorded.clear()
    pt.pyformer_attention_forward(_Module(), q, k, v, fmin)
    assert recorded == [(True, None, False)]


def test_left_padding_loss_differs_from_eager():
    # README: eager averages the values in the padding rows (no key to attend), sdpa and pyformer
    # give zeros; the last padding position's logits predict the first real token
    name = pt.register()
    model = _gpt2(torch.float64)
    ids, mask = _inputs(left=True)
    labels = ids.masked_fill(mask == 0, -100)
    first_real = labels.clone()
    first_real[torch.arange(len(ids)), mask.argmax(-1)] = -100

    def losses(lab):
        out = {}
        for impl in ("eager", "sdpa", name):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                out[impl] = model(input_ids=ids, attention_mask=mask, labels=lab).loss.item()
        return out

    got = losses(labels)
    assert abs(got[name] - got["sdpa"]) <= 1e-12 * got["sdpa"]
    assert abs(got[name] - got["eager"]) > 1e-6 * got["eager"]
    got = losses(first_real)  # without the first real tokens' labels they agree
    assert abs(got[name] - got["eager"]) <= 1e-12 * got["eager"]
