"""Pipeline stages of a ``transformers`` decoder, run by ``torch.distributed.pipelining``.

A stage is the model itself with the modules it does not own removed: the decoder layers
become a ``ModuleDict`` keyed by their original index, so every parameter keeps the full
model's name (``model.layers.3.mlp.up_proj.weight``) and a stage's state dict is a piece of
the Hugging Face checkpoint. The first stage keeps the embeddings, the last the final norm
and ``lm_head``; every stage keeps the rotary embedding (no saved state). The stage's
``forward`` takes what the previous stage sent (token ids on the first stage, hidden states
after it) and returns hidden states, or logits on the last stage.

The split is by hand (``PipelineStage`` over the pruned module), not traced: no graph
capture, the module stays the ``transformers`` one (tensor parallel and FSDP2 apply to it as
to a whole model), and the names stay the checkpoint's.

Tied embeddings (``tie_word_embeddings=True``: ``lm_head.weight`` is the embedding matrix)
would put one parameter on the first and the last stage, whose gradients would then have to
be summed across stages every step; that is refused with a clear error instead.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: ``config.model_type`` of the decoders whose stage forward is implemented here: the Llama
#: layout (``model.embed_tokens``, ``model.layers``, ``model.norm``, ``model.rotary_emb``,
#: ``lm_head``) and a forward that adds nothing between those modules.
PIPELINE_DECODERS = ("llama",)
STYLES = ("1f1b", "gpipe")


def stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """The contiguous decoder layers of ``stage``: as even as possible, earlier stages one more."""
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def check_pipeline_model(model: nn.Module, pp_size: int) -> None:
    """Raise ``ValueError`` for a model the stages cannot be cut from (before anything changes)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PIPELINE_DECODERS:
        raise ValueError(
            f"pipeline stages (pp_size={pp_size}) are built for transformers decoders of model_type "
            f"{list(PIPELINE_DECODERS)}; got {type(model).__name__} (model_type={model_type!r})"
        )
    layers = len(model.model.layers)
    if layers < pp_size:
        raise ValueError(f"pp_size={pp_size} needs at least one decoder layer per stage; the model has {layers}")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "pp_size > 1 with tie_word_embeddings=True: lm_head.weight is the embedding matrix, which the first "
            "and the last stage would both hold; untie it (LlamaConfig(tie_word_embeddings=False)) to pipeline"
        )


def split_stage(model: nn.Module, stage: int, pp_size: int) -> nn.Module:
    """Turn ``model`` (in place) into pipeline stage ``stage`` of ``pp_size``; returns it.

    Args:
        model: a ``transformers`` decoder (:data:`PIPELINE_DECODERS`), untied embeddings.
        stage: this rank's stage, 0 first.
        pp_size: the number of stages.
    """
    check_pipeline_model(model, pp_size)
    decoder = model.model
    owned = stage_layers(len(decoder.layers), pp_size, stage)
    decoder.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in owned})
    if stage != 0:
        decoder.embed_tokens = None
    if stage != pp_size - 1:
        decoder.norm = None
        model.lm_head = None
    model.forward = types.MethodType(_stage_forward, model)
    return model


def _stage_forward(self: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """One stage of ``LlamaModel.forward`` + ``lm_head`` (no cache, no padding mask)."""
    from transformers.masking_utils import create_causal_mask

    decoder = self.model
    hidden = decoder.embed_tokens(inputs) if decoder.embed_tokens is not None else inputs
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(self.config, hidden, None, None, position_ids=positions)
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in decoder.layers.values():
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    if decoder.norm is not None:
        hidden = decoder.norm(hidden)
    if self.lm_head is not None:
        hidden = self.lm_head(hidden)
    return hidden


class PipelineRunner:
    """One rank's stage and its schedules (one per number of micro-batches)."""

    def __init__(self, module: nn.Module, stage: int, pp_size: int, group: Any, device: torch.device, style: str):
        from torch.distributed.pipelining import PipelineStage

        self.stage_index, self.pp_size, self.style = stage, pp_size, style
        self.stage = PipelineStage(module, stage, pp_size, device, group=group)
        self._schedules: dict[int, Any] = {}
        self._criterion: Callable[[Any, Any], torch.Tensor] | None = None

    def _schedule(self, microbatches: int):
        if microbatches not in self._schedules:
            from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

            cls = Schedule1F1B if self.style == "1f1b" else ScheduleGPipe
            self._schedules[microbatches] = cls(self.stage, microbatches, loss_fn=self._loss)
        return self._schedules[microbatches]

    def _loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._criterion(outputs, target)  # type: ignore[misc]

    def run(self, inputs: torch.Tensor, labels: torch.Tensor, criterion, microbatches: int, return_outputs: bool):
        """Forward and backward of one batch through every stage; the loss (mean over
        micro-batches) and outputs on the last stage, None elsewhere."""
        self._criterion = criterion
        schedule = self._schedule(microbatches)
        last = self.stage_index == self.pp_size - 1
        losses: list[torch.Tensor] = []
        if self.stage_index == 0:
            outputs = schedule.step(inputs)
        elif last:
            outputs = schedule.step(target=labels, losses=losses)
        else:
            outputs = schedule.step()
        loss = torch.stack([x.detach() for x in losses]).mean() if last and losses else None
        return {"loss": loss, "outputs": outputs if last and return_outputs else None}


def batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a batch: a dict with ``input_ids`` (and ``labels``, default the
    inputs), an ``(inputs, labels)`` pair, or one tensor (its own labels)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a pipeline batch dict needs 'input_ids' (and 'labels'); got keys {sorted(batch)}")
        return batch["input_ids"], batch.get("labels", batch["input_ids"])
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        return batch, batch
    raise ValueError(
        f"a pipeline batch is a dict with 'input_ids' and 'labels', an (inputs, labels) pair or a tensor; "
        f"got {type(batch).__name__}"
    )
