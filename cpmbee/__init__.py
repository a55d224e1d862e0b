"""cpmbee: CPM-Bee models (OpenBMB) and CPM-Live style training on PyTorch and transformers.

Importing the package registers the ``cpmbee`` model type with ``transformers``' Auto classes, so
``AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)`` work without ``trust_remote_code``
(``cpmbee.hf.register_auto_classes``). The command line (``cpmbee_cli``) skips that, so it parses and
prints help without loading torch; the classes below then load on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "CpmBeeCache",
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTokenizer",
    "__version__",
]

if TYPE_CHECKING:
    from .config import CpmBeeConfig
    from .hf import CpmBeeForCausalLM, CpmBeeTokenizer
    from .model import CpmBeeCache, CpmBeeModel, CpmBeePreTrainedModel

_WHERE = {
    "CpmBeeConfig": "config",
    "CpmBeeForCausalLM": "hf",
    "CpmBeeTokenizer": "hf",
    "CpmBeeCache": "model",
    "CpmBeeModel": "model",
    "CpmBeePreTrainedModel": "model",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cpmbee' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


if "cpmbee_cli" not in sys.modules:  # a program importing cpmbee: register the Auto classes now
    importlib.import_module(".hf", __name__)
