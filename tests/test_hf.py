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
