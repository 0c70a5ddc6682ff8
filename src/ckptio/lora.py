"""LoRA adapters through Hugging Face ``peft``, with ColossalAI's Booster calls.

``booster.enable_lora(model, lora_config=LoraConfig(...))`` wraps the model with peft's
``get_peft_model`` before ``boost`` (ColossalAI's order: the plugin then shards the adapted
model, frozen base and trainable adapters alike). ``booster.save_lora_as_pretrained(model,
folder)`` writes what ``PeftModel.save_pretrained`` writes, ``adapter_model.safetensors`` (or
``.bin``) and ``adapter_config.json``, so ``PeftModel.from_pretrained(base, folder)`` loads
it; ``enable_lora(model, pretrained_dir=folder)`` loads such a folder back, ours or peft's.

peft decides which tensors an adapter holds and under which names
(``get_peft_model_state_dict``: the LoRA matrices, ``modules_to_save`` copies, resized
embeddings, without the adapter name). Given the live tensors, it returns those very objects,
so the names map onto live tensors by identity, and the adapter goes through ckptio's engine
like any state: on FSDP2 ranks each rank writes the pieces it holds into the one file, the
save is one atomic commit with a manifest, and loading checks every key before it copies.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptio.engine.group import Group
from ckptio.engine.load import load_state
from ckptio.engine.save import TensorPart
from ckptio.engine.write import WriteSpec
from ckptio.errors import CheckpointNotFoundError, StateMismatchError
from ckptio.formats import naming
from ckptio.state.model import live_state, unwrap_model
from ckptio.state.report import LoadReport

DEFAULT_ADAPTER = "default"
_ONE_FILE = 1 << 62  # an adapter is one file, whatever its size, as peft writes it


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError that says how to get it."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA needs Hugging Face peft: pip install peft (ckptio is tested with peft 0.21.2)") from exc
    return peft


def peft_model_of(model: nn.Module) -> Any:
    """The ``PeftModel`` inside ``model`` (wrappers peeled off), or a ValueError saying what to do."""
    inner = unwrap_model(model)
    peft = require_peft()
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(
            f"the model ({type(inner).__name__}) has no LoRA adapters: call booster.enable_lora(model, "
            "lora_config=...) before booster.boost(model, ...)"
        )
    return inner


def enable_lora(model: nn.Module, pretrained_dir: str | os.PathLike | None = None, lora_config: Any = None) -> Any:
    """``model`` wrapped with LoRA adapters: new ones from ``lora_config`` (a ``peft.LoraConfig``,
    or any ``peft.PeftConfig``), or the adapter saved in the local folder ``pretrained_dir``
    (``adapter_config.json`` + weights, as peft or :func:`adapter_parts` write it), trainable."""
    peft = require_peft()
    if pretrained_dir is None and lora_config is None:
        raise ValueError("enable_lora needs lora_config (a peft.LoraConfig) or pretrained_dir (a saved adapter)")
    if pretrained_dir is not None and lora_config is not None:
        raise ValueError(
            "enable_lora takes lora_config or pretrained_dir, not both: the adapter folder brings its own "
            f"{naming.ADAPTER_CONFIG}"
        )
    if isinstance(unwrap_model(model), peft.PeftModel):
        raise ValueError("the model already has LoRA adapters (enable_lora was called on it before)")
    if lora_config is not None:
        if not isinstance(lora_config, peft.PeftConfig):
            raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
        return peft.get_peft_model(model, lora_config)
    folder = Path(os.fspath(pretrained_dir))
    if not (folder / naming.ADAPTER_CONFIG).is_file():
        raise CheckpointNotFoundError(
            f"not a LoRA adapter folder: {naming.ADAPTER_CONFIG} is missing (pretrained_dir is a local folder "
            "written by booster.save_lora_as_pretrained or PeftModel.save_pretrained)",
            path=folder,
        )
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.inference_mode = False  # trainable, as ColossalAI's enable_lora loads it
    peft_model = peft.get_peft_model(model, config)
    load_adapter(peft_model, folder)
    return peft_model


def adapter_tensors(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft saves them by, as the live tensors (any
    layout: DTensors on FSDP2 ranks)."""
    peft = require_peft()
    peft_model = peft_model_of(model)
    live = live_state(peft_model)
    saved = peft.get_peft_model_state_dict(peft_model, state_dict=live, adapter_name=adapter_name)
    return dict(saved)


def _saved_to_live(peft_model: Any, adapter_name: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """peft's saved name -> the live key of the same tensor, and the live tensors by live key."""
    live = live_state(peft_model)
    key_of = {id(t): k for k, t in live.items()}
    saved = adapter_tensors(peft_model, adapter_name)
    mapping = {}
    for name, tensor in saved.items():
        if id(tensor) not in key_of:
            raise StateMismatchError(
                f"peft returned a copy for adapter tensor {name!r}, not a live tensor: cannot tell where it loads"
            )
        mapping[name] = key_of[id(tensor)]
    return mapping, {k: live[k] for k in mapping.values()}


def adapter_config_bytes(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> bytes:
    """``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it (``inference_mode`` true,
    the base model's name, peft's auto mapping when there is no task type), from a copy: the
    live config is not changed."""
    peft_model = peft_model_of(model)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    base = peft_model.get_base_model()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    body = config.to_dict()
    body = {k: sorted(v) if isinstance(v, set) else v for k, v in body.items()}
    if config.task_type is None:
        cls = _plain_class(base)
        body["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8")


def _plain_class(module: nn.Module) -> type:
    """The module's own class, not the one FSDP2's ``fully_shard`` derives from it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without distributed)
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def adapter_names(model: nn.Module) -> list[str]:
    return list(peft_model_of(model).peft_config)


def adapter_parts(model: nn.Module, group: Group, *, use_safetensors: bool = True) -> list[TensorPart]:
    """One part per adapter: its weights in one file, then its config, written by the master
    (``default`` at the folder's root, any other adapter in a subfolder named after it, as peft
    lays them out)."""
    parts = []
    for name in adapter_names(model):
        state = {k: t.detach() for k, t in adapter_tensors(model, name).items()}
        weights = naming.ADAPTER_SAFETENSORS if use_safetensors else naming.ADAPTER_BIN
        config = adapter_config_bytes(model, name)
        parts.append(
            TensorPart(
                state,
                WriteSpec(weights, _ONE_FILE, shard=False, use_safetensors=use_safetensors),
                group,
                subdir="" if name == DEFAULT_ADAPTER else name,
                metadata=lambda plan, config=config: {naming.ADAPTER_CONFIG: config},
                slot=f"adapter/{name}",
                master_only=group.solo,
            )
        )
    return parts


def adapter_files(model: nn.Module):
    """The entries of an existing folder an adapter save replaces (the rest are kept)."""
    owned = {naming.ADAPTER_SAFETENSORS, naming.ADAPTER_BIN, naming.ADAPTER_CONFIG}
    owned |= {n for n in adapter_names(model) if n != DEFAULT_ADAPTER}
    return lambda entry: entry in owned


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER, *, strict: bool = True
) -> LoadReport:
    """Load an adapter folder's weights into ``model``'s adapter ``adapter_name`` (this process
    alone: call it before ``boost``). Every key is checked first; a strict load raises on any
    adapter tensor the file lacks or any tensor the adapter does not have."""
    folder = Path(os.fspath(folder))
    for name in (naming.ADAPTER_SAFETENSORS, naming.ADAPTER_BIN):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise CheckpointNotFoundError(
            f"adapter weights are missing: expected {naming.ADAPTER_SAFETENSORS} or {naming.ADAPTER_BIN}", path=folder
        )
    mapping, dest = _saved_to_live(peft_model_of(model), adapter_name)
    return load_state(dest, weights, Group.of_one(), strict=strict, key_map=mapping)
