"""Shared fixtures.

Conformance tests read ``../shared`` (the real vocabulary and the golden outputs of the original
implementation) relative to the repository root. Without it they are skipped with a loud reason; the
package itself never needs that folder.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from cpmbee.data.vocab import SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CPMBEE_SHARED", REPO_ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
VOCAB = SHARED / "cpm-bee" / "vocab.txt"

_MISSING = (
    f"SKIPPED: {SHARED} not found. Golden conformance tests need the shared/ folder beside the repository "
    "(real vocab.txt and the original implementation's outputs); set CPMBEE_SHARED to point at it."
)


def require_shared() -> None:
    if not (VOCAB.is_file() and GOLDEN.is_dir()):
        warnings.warn(_MISSING, stacklevel=2)
        pytest.skip(_MISSING)


def load_golden(name: str) -> dict:
    require_shared()
    with open(GOLDEN / name, encoding="utf-8") as f:
        return json.load(f)


def golden_model_names() -> list[str]:
    """Names of the golden models (``meta.json``), so any golden set runs through the same tests."""
    if not (GOLDEN / "meta.json").is_file():
        return ["(golden data missing)"]
    with open(GOLDEN / "meta.json", encoding="utf-8") as f:
        return [m["name"] for m in json.load(f)["models"]]


def golden_masked_model_name() -> str:
    """A golden model with ``mask_modules`` (pruned layers) when the set has one, else the first model."""
    with open(GOLDEN / "meta.json", encoding="utf-8") as f:
        models = json.load(f)["models"]
    return next((m["name"] for m in models if m["config"].get("mask_modules")), models[0]["name"])


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    require_shared()
    return VOCAB


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    from cpmbee import CpmBeeTokenizer

    return CpmBeeTokenizer(vocab_file)


# A small synthetic vocabulary in the CPM-Bee layout, for tests that need no real data.
TINY_SPECIALS = list(SPECIAL_TOKENS)
TINY_WORDS = [
    *"abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'\"()[]{}-_=+*/<>@#$%&",
    *["the", " the", "an", " a", "in", "on", "is", " is", "input", "prompt", "question", "options"],
    *"今天气不错，。好你我他是的中国北京",
    *["今天", "天气", "不错", "中国", "北京", "<eod>"],
]


@pytest.fixture(scope="session")
def tiny_vocab_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(TINY_SPECIALS + TINY_WORDS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab_file):
    from cpmbee import CpmBeeTokenizer

    return CpmBeeTokenizer(tiny_vocab_file)


def tiny_config(vocab_size: int, **overrides):
    from cpmbee import CpmBeeConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=4,
        dim_head=8,
        dim_ff=48,
        num_hidden_layers=3,
        position_bias_num_buckets=32,
        position_bias_num_segment_buckets=32,
        position_bias_max_distance=64,
    )
    kwargs.update(overrides)
    return CpmBeeConfig(**kwargs)


def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a model large random weights (non-flat logits), like the golden models."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm_before_attention.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("input_embedding.weight"):
                p.copy_(3.0 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model
