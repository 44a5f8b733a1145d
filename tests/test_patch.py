"""pyformer.integrations.transformers.patch(model): a patched Hugging Face model gives the
unpatched one's outputs and gradients, on pyformer's ops.

Small models from configs with random weights (norm weights drawn too, so that Gemma's offset
weight is not all zeros); nothing is downloaded. Skipped without ``transformers``.
"""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyformer.functional as PF  # noqa: E402
from pyformer.integrations import transformers as pt  # noqa: E402
from pyformer.testing import BOUNDS, rel_err  # noqa: E402

VOCAB = 128
OPS = ("rms_norm", "layer_norm", "apply_rotary", "swiglu", "attention")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the models are tiny: a matmul's compute is microseconds, waking a second thread for it costs
    # more (milliseconds on some machines)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quiet():
    transformers.logging.set_verbosity_error()
    yield


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of pyformer's ops (the patched modules look them up at call time)."""
    count = dict.fromkeys(OPS, 0)
    for name in OPS:
        orig = getattr(PF, name)

        def wrap(*a, __orig=orig, __name=name, **k):
            count[__name] += 1
            return __orig(*a, **k)

        monkeypatch.setattr(PF, name, wrap)
    return count


# ---- the models ---------------------------------------------------------------------------------

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)


def _config(family):
    import transformers as T

    if family == "llama":
        return T.LlamaConfig(**_DECODER)
    if family == "mistral":
        return T.MistralConfig(**_DECODER)
    if family == "qwen2":
        return T.Qwen2Config(**_DECODER)
    if family == "qwen3":
        return T.Qwen3Config(**_DECODER, head_dim=16)
    if family == "gemma":
        return T.GemmaConfig(**_DECODER, head_dim=16)
    if family == "gpt2":
        return T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    if family == "bert":
        return T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=256,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    raise ValueError(family)


@functools.lru_cache(maxsize=None)
def _base(family):
    """The float32 model of a family, never patched (tests take copies)."""
    cfg = _config(family)
    # the reference attention: eager where it computes in the model's dtype (GPT-2, BERT; the
    # most accurate in float32), SDPA for the families whose eager softmax runs in float32
    cfg._attn_implementation = "eager" if family in ("gpt2", "bert") else "sdpa"
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name:  # init ones or zeros: draw them
                p.normal_(0.0, 0.5)
    return model.eval()


def _pair(family, dtype=torch.float32):
    """(unpatched, patched, counts): copies of the family's model in dtype."""
    ref = copy.deepcopy(_base(family)).to(dtype)
    model = copy.deepcopy(ref)
    return ref, model, pt.patch(model)


CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]
FAMILIES = CAUSAL + ["bert"]

# per family: rms_norm, layer_norm, rotary, swiglu, attention (2 layers)
EXPECTED = {
    "llama": (5, 0, 2, 2, 2),
    "mistral": (5, 0, 2, 2, 2),
    "qwen2": (5, 0, 2, 2, 2),
    "qwen3": (9, 0, 2, 2, 2),  # q_norm and k_norm on the head dim
    "gemma": (5, 0, 2, 0, 2),  # a GELU MLP
    "gpt2": (0, 5, 0, 0, 2),
    "bert": (0, 5, 0, 0, 2),
}
KINDS = ("rms_norm", "layer_norm", "rotary", "swiglu", "attention")


def _batch(left, b=3, s=10, lengths=(10, 6, 3)):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b, s), generator=gen)
    mask = (torch.arange(s) < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(-1)
    return ids.masked_fill(mask == 0, 0), mask


# ---- outputs and gradients ----------------------------------------------------------------------


def _run(model, family, ids, mask):
    """(compared outputs, loss): for a causal LM the logits at real tokens and the loss over the
    tokens predicted from a real token (a left-padded row's pad positions see no key at all); for
    BERT every position of the last hidden state."""
    if family == "bert":
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        gen = torch.Generator().manual_seed(2)
        cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        return out, (out * cot).sum()
    real = mask.bool()
    predicted_from_real = real & torch.cat([real[:, :1], real[:, :-1]], 1)
    labels = ids.masked_fill(~predicted_from_real, -100)
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    return res.logits[real], res.loss


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_match(family, dtype, left):
    ref, model, _ = _pair(family, dtype)
    ids, mask = _batch(left)
    bound = BOUNDS[dtype]
    out_ref, loss_ref = _run(ref, family, ids, mask)
    loss_ref.backward()
    out, loss = _run(model, family, ids, mask)
    loss.backward()
    assert rel_err(out, out_ref) <= bound
    assert rel_err(loss, loss_ref) <= bound
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        g_ref = grads[name]
        assert (p.grad is None) == (g_ref is None), name
        if g_ref is not None:
            err = float((p.grad.double() - g_ref.double()).norm())
            assert err <= bound * _grad_scale(grads, name), (name, err)


def _grad_scale(grads, name):
    """The norm a gradient's error is measured against: its own, and for a bias at least its
    weight's. A key projection's bias has a zero gradient in exact arithmetic (the softmax over
    keys does not change when every score of a row shifts by one number), so both runs give
    rounding noise there; its weight's gradient is of the size those rounding errors scale with."""
    scale = float(grads[name].double().norm())
    weight = name[: -len("bias")] + "weight"
    if name.endswith(".bias") and grads.get(weight) is not None:
        scale = max(scale, float(grads[weight].double().norm()))
    return scale


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_matches(family):
    ref, model, _ = _pair(family)
    ids, mask = _batch(left=True, s=6, lengths=(6, 4, 2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, **kw)
    got = model.generate(ids, attention_mask=mask, **kw)
    assert got.shape[1] > ids.shape[1]
    assert torch.equal(got, want)


# ---- what patch reports and calls ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_and_ops_called(family, calls):
    ref, model, counts = _pair(family)
    assert tuple(counts[k] for k in KINDS) == EXPECTED[family]
    if family == "gemma":
        assert counts["left"] == [
            (f"model.layers.{i}.mlp", "swiglu: act_fn is GELUTanh, not SiLU") for i in range(2)
        ]
    else:
        assert counts["left"] == []
    ids, mask = _batch(left=False)
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)
        assert all(v == 0 for v in calls.values())  # the unpatched copy runs none of them
        model(input_ids=ids, attention_mask=mask)
    # one call per patched module in one forward
    assert calls["rms_norm"] == counts["rms_norm"]
    assert calls["layer_norm"] == counts["layer_norm"]
    assert calls["apply_rotary"] == counts["rotary"]
    assert calls["swiglu"] == counts["swiglu"]
    assert calls["attention"] == counts["attention"]


def test_float64_norms_run_transformers_code(calls):
    # Llama's RMSNorm computes float64 input in float32; pyformer's op would compute in float64
    ref, model, counts = _pair("llama", torch.float64)
    ids, mask = _batch(left=False)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls["rms_norm"] == 0
    assert calls["apply_rotary"] == 2 and calls["swiglu"] == 2 and calls["attention"] == 2


def test_patch_twice_is_harmless(calls):
    from transformers.models.llama import modeling_llama

    ref, model, first = _pair("llama")
    classes = [type(m) for m in model.modules()]
    wrapper = modeling_llama.apply_rotary_pos_emb
    second = pt.patch(model)
    assert {k: second[k] for k in KINDS} == dict.fromkeys(KINDS, 0)
    assert second["left"] == []
    assert [type(m) for m in model.modules()] == classes
    assert modeling_llama.apply_rotary_pos_emb is wrapper
    assert not hasattr(wrapper._pyformer_original, "_pyformer_original")  # wrapped once
    # a second model of the family shares the replacement classes and the one wrapper
    _, other, counts = _pair("llama")
    assert {k: counts[k] for k in KINDS} == {k: first[k] for k in KINDS}
    assert [type(m) for m in other.modules()] == classes
    assert modeling_llama.apply_rotary_pos_emb is wrapper
    ids, mask = _batch(left=False)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert calls["apply_rotary"] == 2 and calls["rms_norm"] == 5  # once each per module
    assert rel_err(out, want) <= BOUNDS[torch.float32]


def test_unpatched_model_keeps_transformers_rotary(calls, monkeypatch):
    from transformers.models.llama import modeling_llama

    ref, model, _ = _pair("llama")
    original = modeling_llama.apply_rotary_pos_emb._pyformer_original
    halves = {"n": 0}
    rotate_half = modeling_llama.rotate_half

    def counting(x):  # what transformers' apply_rotary_pos_emb calls, twice per layer
        halves["n"] += 1
        return rotate_half(x)

    monkeypatch.setattr(modeling_llama, "rotate_half", counting)
    ids, mask = _batch(left=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert (calls["apply_rotary"], halves["n"]) == (2, 0)
        ref(input_ids=ids, attention_mask=mask)
        assert (calls["apply_rotary"], halves["n"]) == (2, 4)
    # outside a patched attention the module function is transformers' own
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    want = original(q, k, cos, sin)
    assert calls["apply_rotary"] == 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rotary_wrapper_falls_back(calls):
    from transformers.models.llama import modeling_llama

    _pair("llama")  # wraps the module function
    wrapper = modeling_llama.apply_rotary_pos_emb
    original = wrapper._pyformer_original
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    square = torch.randn(2, 5, 5, 16)  # H == L: a 2-dim cos broadcasts, over heads
    cases = [
        (square, square, cos[0], sin[0]),  # (L, D) is unsqueezed to (L, 1, D): not the kernel's
        (q.double(), k.double(), cos, sin),  # mixed dtypes: transformers' function promotes
        (q, k, cos[..., :8], sin[..., :8]),  # D_rot < D: transformers' function cannot broadcast
        (q, k, cos[0], sin[0]),  # (L, 1, D) against (B, H, L, D), H != L: no broadcast either
    ]
    pt._ROTARY.depth = 1  # as inside a patched attention module
    try:
        for args in cases[:2]:
            got, want = wrapper(*args), original(*args)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        for args in cases[2:]:  # transformers' error, not a result
            with pytest.raises(RuntimeError, match="must match"):
                wrapper(*args)
        assert calls["apply_rotary"] == 0
        # the (B, L, H, D) layout, unsqueeze_dim=2: transformers' function
        args = (q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        got, want = wrapper(*args, unsqueeze_dim=2), original(*args, unsqueeze_dim=2)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert calls["apply_rotary"] == 0
        got, want = wrapper(q, k, cos, sin), original(q, k, cos, sin)
        assert calls["apply_rotary"] == 1
        assert all(rel_err(a, b) <= BOUNDS[torch.float32] for a, b in zip(got, want))
    finally:
        pt._ROTARY.depth = 0


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_mixed_dtype_norm_falls_back(family, calls):
    # a bfloat16 input with a float32 weight: Llama's norm returns float32 (the promoted dtype),
    # Gemma's bfloat16; either way transformers' own code runs
    _, model, _ = _pair(family)
    norm = model.model.norm
    base = type(norm)._pyformer_base
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = norm(x), base.forward(norm, x)
    assert calls["rms_norm"] == 0
    assert got.dtype == want.dtype == (torch.float32 if family == "llama" else torch.bfloat16)
    assert torch.equal(got, want)
    # bfloat16 weight and input: pyformer's op, rounded once (transformers rounds twice for Llama)
    norm.to(torch.bfloat16)
    with torch.no_grad():
        got, want = norm(x), base.forward(norm, x)
    assert calls["rms_norm"] == 1 and got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got, want) <= BOUNDS[torch.bfloat16]


def test_bfloat16_model(calls):
    ref, model, _ = _pair("llama", torch.bfloat16)
    ids, mask = _batch(left=False)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert calls["rms_norm"] == 5 and calls["apply_rotary"] == 2 and calls["swiglu"] == 2
    assert rel_err(out, want) <= BOUNDS[torch.bfloat16]


def test_flags_select_kinds(calls):
    model = copy.deepcopy(_base("llama"))
    counts = pt.patch(model, attention=False, rotary=False, mlp=False)
    assert {k: counts[k] for k in KINDS} == {**dict.fromkeys(KINDS, 0), "rms_norm": 5}
    assert model.config._attn_implementation == "sdpa"
    counts = pt.patch(model)  # the rest, later
    assert {k: counts[k] for k in KINDS} == {
        **dict.fromkeys(KINDS, 2),
        "rms_norm": 0,
        "layer_norm": 0,
    }


def test_pickle_and_deepcopy_keep_the_patch(calls):
    ref, model, _ = _pair("qwen3")
    ids, mask = _batch(left=False)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]
        before = dict(calls)
        with torch.no_grad():
            got = copied(input_ids=ids, attention_mask=mask).logits
        assert calls["rms_norm"] - before["rms_norm"] == 9
        assert torch.equal(got, want)


def test_state_dict_and_parameters_kept():
    base = copy.deepcopy(_base("qwen3"))
    params = {n: p for n, p in base.named_parameters()}
    keys = list(base.state_dict())
    pt.patch(base)
    assert all(p is params[n] for n, p in base.named_parameters())
    assert list(base.state_dict()) == keys
    norm = base.model.layers[0].self_attn.q_norm
    assert isinstance(norm, transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm)
    assert type(norm).__name__ == "Qwen3RMSNorm"


def test_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pt.patch("model")
    with pytest.raises(TypeError, match="'rotary'"):
        pt.patch(torch.nn.Linear(2, 2), rotary=1)
    assert pt.patch(torch.nn.Linear(2, 2)) == {**dict.fromkeys(KINDS, 0), "left": []}


def test_unverified_code_is_left_and_reported(calls):
    # Olmo2: a family not verified (its RMSNorm rounds weight * x once, not weight times the
    # rounded x; its rotary is not read); its MLP is the verified SwiGLU form
    cfg = transformers.Olmo2Config(**_DECODER)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = copy.deepcopy(ref)
    counts = pt.patch(model)
    assert tuple(counts[k] for k in KINDS) == (0, 0, 0, 2, 2)
    reasons = dict(counts["left"])
    assert len(reasons) == 11  # 5 norms per layer (q_norm and k_norm too), the final norm, 2 rotary
    assert "not a family whose RMSNorm pyformer verified" in reasons["model.norm"]
    assert "not a family whose rotary pyformer verified" in reasons["model.layers.0.self_attn"]
    ids, mask = _batch(left=False)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert calls["rms_norm"] == calls["apply_rotary"] == 0 and calls["swiglu"] == 2
    assert rel_err(out, want) <= BOUNDS[torch.float32]

    # a class of a verified family whose forward is not the verified one
    class LlamaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            return self.weight * hidden_states  # not a norm at all

    LlamaRMSNorm.__module__ = "transformers.models.llama.modeling_llama"
    holder = torch.nn.Sequential(LlamaRMSNorm())
    counts = pt.patch(holder)
    assert counts["rms_norm"] == 0
    assert counts["left"] == [("0", "rms_norm: LlamaRMSNorm: not the verified Llama form")]
    assert type(holder[0]) is LlamaRMSNorm
