"""``config.json`` / ``generation_config.json`` beside the weights, for ``from_pretrained``.

Hugging Face's own ``save_pretrained`` writes ``architectures`` and ``dtype`` into the live
config; we serialise a deep copy so saving never changes the model the user holds.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys

from torch import nn

from ckptio.formats.naming import HF_CONFIG, HF_GENERATION_CONFIG


def is_hf_model(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def hf_config_files(model: nn.Module) -> dict[str, bytes]:
    if not is_hf_model(model):
        return {}
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    dtype_name = str(model.dtype).removeprefix("torch.")
    # transformers >= 4.56 calls it `dtype` (and warns on `torch_dtype`); older versions the reverse.
    attr = "dtype" if "dtype" in inspect.signature(type(config).__init__).parameters else "torch_dtype"
    with contextlib.suppress(Exception):
        setattr(config, attr, dtype_name)
    files = {HF_CONFIG: config.to_json_string(use_diff=True).encode("utf-8")}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and can_generate():
        files[HF_GENERATION_CONFIG] = copy.deepcopy(generation).to_json_string(use_diff=True).encode("utf-8")
    return files
