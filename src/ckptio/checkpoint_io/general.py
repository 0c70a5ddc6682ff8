"""CheckpointIO for one process (or data parallel replicas handled by hand)."""

from __future__ import annotations

from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.hf_config import hf_config_files
from ckptio.checkpoint_io.model_files import ModelSaveOptions, load_model_state, save_model_state
from ckptio.checkpoint_io.model_state import (
    LoadReport,
    alias_groups,
    clean_key,
    model_state_for_save,
    unwrap_model,
)


def live_model_state(model: nn.Module) -> tuple[dict, dict[str, str]]:
    """The live tensors to load into (sharing memory with the parameters) and tied aliases."""
    state = {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}
    return state, alias_groups(state)


class GeneralCheckpointIO(CheckpointIO):
    def _save_model(self, model: nn.Module, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async):
        state, _ = model_state_for_save(model)
        extra = hf_config_files(unwrap_model(model)) if opts.shard else None
        save_model_state(state, checkpoint, opts, extra_files=extra)

    def _load_model(self, model: nn.Module, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify):
        dest, aliases = live_model_state(model)
        report: LoadReport = load_model_state(
            dest, checkpoint, strict=strict, aliases=aliases, num_threads=num_threads, verify=verify
        )
        return report
