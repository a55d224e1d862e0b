"""CpmBeeForCausalLM against the original's golden outputs, plus cache, mask and training invariants."""

from __future__ import annotations

import functools

import pytest
import torch

from cpmbee import CpmBeeCache, CpmBeeForCausalLM
from cpmbee.checkpoint import load_model

from .conftest import GOLDEN, golden_model_names, load_golden, random_weights_, require_shared, tiny_config

MODELS = golden_model_names()
# FORMAT.md §9
ATOL_HIDDEN, ATOL_LOGITS = 1e-5, 1e-4
FORWARD_ARGS = {
    "input": "input_ids",
    "input_sub": "input_id_sub",
    "length": "length",
    "context": "context",
    "sample_ids": "sample_ids",
    "num_segments": "num_segments",
    "segment": "segment",
    "segment_rel_offset": "segment_rel_offset",
    "segment_rel": "segment_rel",
    "span": "span",
    "ext_table_ids": "ext_table_ids",
    "ext_table_sub": "ext_table_sub",
    "position": "position",
}


@functools.cache
def golden_model(name: str, attn: str) -> CpmBeeForCausalLM:
    return load_model(
        GOLDEN / f"weights_{name}.safetensors",
        config=GOLDEN / f"config_{name}.json",
        attn_implementation=attn,
    )


@functools.cache
def golden_tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / f"model_{name}.safetensors"))


def _args(tensors, prefix):
    return {
        FORWARD_ARGS[key[len(prefix) :]]: value
        for key, value in tensors.items()
        if key.startswith(prefix) and key[len(prefix) :] in FORWARD_ARGS
    }


def _check_outputs(logits, hidden, tensors, prefix, where):
    cols = tensors[prefix + "out/logits_cols"]
    assert logits.shape[-1] == cols.max().item() + 1 or logits.shape[-1] > cols.max().item()
    torch.testing.assert_close(hidden, tensors[prefix + "out/hidden"], atol=ATOL_HIDDEN, rtol=0, msg=where)
    torch.testing.assert_close(
        logits[..., cols], tensors[prefix + "out/logits_sel"], atol=ATOL_LOGITS, rtol=0, msg=where
    )
    torch.testing.assert_close(
        torch.logsumexp(logits, -1), tensors[prefix + "out/logsumexp"], atol=ATOL_LOGITS, rtol=0, msg=where
    )
    top_values = tensors[prefix + "out/top_values"]
    torch.testing.assert_close(
        torch.topk(logits, top_values.shape[-1]).values, top_values, atol=ATOL_LOGITS, rtol=0
    )
    # argmax may differ only where the top-2 gap is below the tolerance (FORMAT.md §9)
    gap = top_values[..., 0] - top_values[..., 1]
    same = logits.argmax(-1) == tensors[prefix + "out/argmax"]
    assert bool((same | (gap < ATOL_LOGITS)).all()), where
    if prefix + "out/logits" in tensors:
        torch.testing.assert_close(
            logits, tensors[prefix + "out/logits"], atol=ATOL_LOGITS, rtol=0, msg=where
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_golden(name, attn):
    meta = load_golden(f"model_{name}.json")
    model, tensors = golden_model(name, attn), golden_tensors(name)
    assert len(meta["forward"]) >= 6
    for case in meta["forward"]:
        prefix = case["name"] + "/"
        with torch.no_grad():
            out = model(**_args(tensors, prefix + "arg/"), output_hidden_states=True)
        assert list(out.logits.shape) == case["logits_shape"]
        _check_outputs(out.logits, out.hidden_states[-1], tensors, prefix, f"{name}/{case['name']}/{attn}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_incremental_matches_golden(name, attn):
    meta = load_golden(f"model_{name}.json")
    model, tensors = golden_model(name, attn), golden_tensors(name)
    assert meta["incremental"]
    for case in meta["incremental"]:
        cache = None
        for step in case["steps"]:
            prefix = f"{case['name']}.{step['prefix']}"
            args = _args(tensors, prefix + "arg/")
            with torch.no_grad():
                out = model(**args, past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            _check_outputs(out.logits, out.hidden_states[-1], tensors, prefix, prefix)
        assert [k is None for k in cache.keys] == case["buffer_layers_none"]
        if "buffer_after_last_step" in case:
            buf = case["buffer_after_last_step"]
            assert cache.meta["position"][:, : len(cache)].tolist() == buf["buffer_position"]
            assert cache.meta["context"][:, : len(cache)].tolist() == buf["buffer_context"]
            assert cache.meta["sample_ids"][:, : len(cache)].tolist() == buf["buffer_sample_ids"]
            assert cache.meta["segment"][:, : len(cache)].tolist() == buf["buffer_segments"]
            assert cache.meta["valid"][:, : len(cache)].tolist() == [
                [n != 0 for n in row] for row in buf["buffer_num_segments"]
            ]


# ------------------------------------------------------------------------------------------------ invariants
def _random_batch(vocab, batch=3, length=24, n_ext=3, seed=0):
    """A batch with two packed instances per row, in-context samples, answers and right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.int32)
    sub = torch.randint(0, 3, (batch, length), generator=g, dtype=torch.int32) * (
        torch.rand(batch, length, generator=g) < 0.2
    )
    lengths = torch.tensor([length, length - 5, length - 9][:batch], dtype=torch.int32)
    span = (torch.arange(length) >= length // 2).int().expand(batch, -1).contiguous()
    sample_ids = ((torch.arange(length) % 12) >= 9).int().expand(batch, -1).contiguous()
    context = torch.rand(batch, length, generator=g) < 0.6
    num_segments = torch.full((batch, length), 3, dtype=torch.int32)
    segment = torch.randint(0, 3, (batch, length), generator=g, dtype=torch.int32)
    segment_rel = torch.randint(0, 30, (batch, 18), generator=g, dtype=torch.int32)
    offset = torch.where(sample_ids > 0, 9, 0).int()
    for b, n in enumerate(lengths.tolist()):
        num_segments[b, n:] = 0
    return dict(
        input_ids=ids,
        input_id_sub=sub.int(),
        length=lengths,
        context=context,
        sample_ids=sample_ids,
        num_segments=num_segments,
        segment=segment,
        segment_rel_offset=offset,
        segment_rel=segment_rel,
        span=span,
        ext_table_ids=torch.randint(0, vocab, (n_ext,), generator=g, dtype=torch.int32),
        ext_table_sub=torch.arange(1, n_ext + 1, dtype=torch.int32),
    )


def _tiny_model(**overrides):
    config = tiny_config(200, **overrides)
    return random_weights_(CpmBeeForCausalLM(config)).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_equals_no_cache(attn):
    """Prefill + one token at a time through the cache == one forward over everything (causal answers)."""
    model = _tiny_model(mask_modules=[[False, False], [True, False], [False, True]])
    model.config._attn_implementation = attn
    batch = _random_batch(200, batch=2, length=20)
    for key in ("length", "span"):
        batch.pop(key)
    batch["num_segments"][:] = 3
    batch["context"][:, 12:] = False  # the answer part is causal
    batch["sample_ids"][:, 12:] = 0
    with torch.no_grad():
        full = model(**batch).logits
        cache = CpmBeeCache(model.config.num_hidden_layers, 2, max_length=4)  # forces growth too
        parts = [slice(0, 12)] + [slice(i, i + 1) for i in range(12, 20)]
        outs = []
        for sl in parts:
            step = {k: (v[:, sl] if v.dim() == 2 and k != "segment_rel" else v) for k, v in batch.items()}
            step["position"] = torch.arange(sl.start, sl.stop, dtype=torch.int32).expand(2, -1)
            out = model(**step, past_key_values=cache, use_cache=True)
            outs.append(out.logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-5)
    assert cache.capacity >= 20 and len(cache) == 20


def test_cache_reorder_follows_rows():
    model = _tiny_model()
    batch = _random_batch(200, batch=3, length=10)
    for key in ("length", "span", "sample_ids", "segment_rel_offset"):
        batch.pop(key)
    batch["num_segments"][:] = 3
    nxt = {
        "input_ids": torch.tensor([[5], [6], [7]], dtype=torch.int32),
        "position": torch.full((3, 1), 10, dtype=torch.int32),
    }
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        cache.reorder(torch.tensor([2, 0, 0]))
        got = model(**nxt, segment_rel=batch["segment_rel"][[2, 0, 0]], past_key_values=cache).logits
        fresh = {k: (v[[2, 0, 0]] if v.dim() == 2 else v) for k, v in batch.items()}
        cache2 = model(**fresh, use_cache=True).past_key_values
        want = model(**nxt, segment_rel=fresh["segment_rel"], past_key_values=cache2).logits
    torch.testing.assert_close(got, want)


def test_mask_modules_remove_parameters():
    config = tiny_config(100, mask_modules=[[True, False], [False, True], [True, True]])
    keys = set(CpmBeeForCausalLM(config).state_dict())
    assert not any(k.startswith("cpmbee.encoder.layers.0.self_att") for k in keys)
    assert "cpmbee.encoder.layers.0.ffn.ffn.w_in.w_0.weight" in keys
    assert not any(k.startswith("cpmbee.encoder.layers.1.ffn") for k in keys)
    assert not any(k.startswith("cpmbee.encoder.layers.2.") for k in keys)
    assert (
        "cpmbee.encoder.output_layernorm.weight" in keys
        and "cpmbee.position_bias.relative_attention_bias" in keys
    )


def test_padded_rows_give_finite_gradients_and_loss_matches_manual_ce():
    model = _tiny_model()
    model.train()
    batch = _random_batch(200)
    labels = torch.where(~batch["context"], batch["input_ids"].long(), -100)
    labels[0, 3] = 200 + 1  # an ext column
    out = model(**batch, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_same_gradients():
    batch = _random_batch(200)
    labels = torch.where(~batch["context"], batch["input_ids"].long(), -100)
    grads = []
    for checkpointing in (False, True):
        model = _tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(dtype):
    model = CpmBeeForCausalLM(tiny_config(200)).eval()  # the default init: moderate logits
    batch = _random_batch(200)
    with torch.no_grad():
        ref = model(**batch).logits
        low = model.to(dtype)(**batch).logits
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_defaults_for_plain_input_ids():
    model = _tiny_model()
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (2, 7, 200)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 7))


def test_logits_to_keep():
    model = _tiny_model()
    batch = _random_batch(200)
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:])


def test_golden_rotary_frequencies():
    require_shared()
    meta = load_golden("meta.json")
    from cpmbee.model import CpmBeeRotaryEmbedding

    for entry in meta["rotary_inv_freq_cpu"]:
        rotary = CpmBeeRotaryEmbedding(entry["dim"])
        got = [f"{int(x):08x}" for x in rotary._inv_freq_cpu.view(torch.int32).tolist()]
        assert got == entry["inv_freq_float32_hex"]


def test_golden_position_buckets():
    require_shared()
    from safetensors.torch import load_file

    from cpmbee.model import CpmBeeBucketPositionBias

    meta = load_golden("meta.json")
    tables = load_file(str(GOLDEN / "position_buckets.safetensors"))
    for entry in meta["position_buckets"]:
        bias = CpmBeeBucketPositionBias(4, entry["num_buckets"], 8, entry["max_distance"])
        assert torch.equal(bias.position_bucket(tables["rel_positions"]), tables[entry["tensor"]])
