"""cpmbee: CPM-Bee models (OpenBMB) and CPM-Live style training on PyTorch and transformers.

Importing the package registers the ``cpmbee`` model type with ``transformers``' Auto classes, so
``AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)`` work without ``trust_remote_code``.
"""

from __future__ import annotations

from .config import CpmBeeConfig
from .model import CpmBeeCache, CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .tokenizer import CpmBeeTokenizer

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


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig)
        AutoModel.register(CpmBeeConfig, CpmBeeModel)
        AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM)
        AutoTokenizer.register(CpmBeeConfig, slow_tokenizer_class=CpmBeeTokenizer)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
