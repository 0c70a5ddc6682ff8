"""ColossalAI's precision, clipping and gradient-sync arguments, mapped onto FSDP2 and DDP.

ColossalAI's ZeRO and Gemini plugins cast the model to ``fp16``/``bf16`` and keep fp32 master
weights inside their own optimizer wrapper, which also clips gradients (``max_norm``) and
scales the loss for fp16. Here the user's optimizer is kept (a scheduler built on it keeps
working), so the same effects come from what torch offers:

* ``precision="bf16"``: FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``: forward
  and backward in bf16, the sharded parameters (the optimizer's, and the checkpoint's) in fp32
  with ``master_weights=True``, in bf16 without.
* ``precision="fp16"`` is refused: it needs dynamic loss scaling, which ckptio does not do.
* ``max_norm > 0``: ``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters, run by
  an optimizer step pre-hook, so ``optimizer.step()`` clips as ColossalAI's does
  (:func:`clip_grad_norm` combines DTensor gradients on different meshes).
* :func:`no_sync`: DDP's ``no_sync()`` or FSDP2's ``set_requires_gradient_sync(False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

SUPPORTED_PRECISIONS = ("fp32", "bf16")


def check_precision(plugin: str, precision: str) -> None:
    """Refuse what ckptio cannot run, naming what it can."""
    if precision == "fp16":
        raise NotImplementedError(
            f"{plugin}(precision='fp16') is not supported: fp16 training needs dynamic loss scaling, which "
            "ckptio does not implement. Use precision='bf16' (bf16 forward/backward, fp32 master weights, no loss "
            "scaling needed) or precision='fp32'"
        )
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(f"{plugin}(precision={precision!r}): expected one of {list(SUPPORTED_PRECISIONS)}")


def check_max_norm(plugin: str, max_norm: float, norm_type: float) -> None:
    if not isinstance(max_norm, int | float) or max_norm < 0:
        raise ValueError(f"{plugin}(max_norm={max_norm!r}): expected a number >= 0 (0 disables clipping)")
    if not isinstance(norm_type, int | float) or norm_type <= 0:
        raise ValueError(f"{plugin}(norm_type={norm_type!r}): expected a positive number (2.0: the Euclidean norm)")


def reject(plugin: str, name: str, value: Any, default: Any, why: str) -> None:
    """An argument ColossalAI has and ckptio cannot honour: its default passes, anything else raises."""
    if value != default:
        raise NotImplementedError(f"{plugin}({name}={value!r}) is not supported: {why}")


def mixed_precision_policy(
    precision: str,
    *,
    reduce_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
    cast_inputs: bool = True,
) -> Any:
    """The ``MixedPrecisionPolicy`` for ``fully_shard``, or None when nothing changes dtype.

    ``reduce_dtype`` None reduces gradients in the compute dtype, as ColossalAI's default
    ``communication_dtype=None`` does."""
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    if param_dtype is None and reduce_dtype is None and output_dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, output_dtype=output_dtype, cast_forward_inputs=cast_inputs
    )


def cast_parameters(model: nn.Module, precision: str, master_weights: bool) -> None:
    """Give the stored parameters their dtype before sharding: fp32 master weights under bf16
    (a model loaded in bf16 is upcast), or bf16 itself without master weights.

    The parameter objects stay the same (``.data`` is replaced), so an optimizer built on them
    still points at them; buffers keep their dtype."""
    if precision != "bf16":
        return
    dtype = torch.float32 if master_weights else torch.bfloat16
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, also when the gradients are DTensors on different
    meshes (tensor parallel weights on the 2-D mesh, replicated ones on ``dp`` alone), which
    torch's cannot combine: each mesh's norm is reduced to a plain tensor first."""
    from ckptio.engine.tensors import is_dtensor

    meshes = {id(p.grad.device_mesh) if is_dtensor(p.grad) else None for p in params if p.grad is not None}
    if len(meshes) <= 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    by_mesh: dict[int | None, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(id(p.grad.device_mesh) if is_dtensor(p.grad) else None, []).append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if is_dtensor(norm) else norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type)
    for group in by_mesh.values():  # one mesh per call: a plain 0-dim norm scales any DTensor
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def clip_before_step(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float) -> None:
    """Make ``optimizer.step()`` clip the gradient norm of its parameters to ``max_norm`` first,
    as ColossalAI's optimizer wrappers do.

    The hook runs :func:`clip_grad_norm` (``torch.nn.utils.clip_grad_norm_``, the call a user
    would write before ``step()``); boosting again replaces it, never stacks a second one."""
    previous = getattr(optimizer, "_ckptio_clip_hook", None)
    if previous is not None:
        previous.remove()
        optimizer._ckptio_clip_hook = None
    if not max_norm:
        return

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if params:
            clip_grad_norm(params, max_norm, norm_type)

    optimizer._ckptio_clip_hook = optimizer.register_step_pre_hook(clip)


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: nn.Module | None, *, wrapped: bool = True) -> AbstractContextManager[None]:
    """A context in which ``backward()`` accumulates gradients locally, without communication;
    the first ``backward()`` after it synchronises the accumulated gradients.

    DDP: its ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` inside, ``True`` on exit.
    A model with neither has nothing to synchronise; ``wrapped=True`` (under a plugin) refuses it
    instead, since it is not the model ``boost()`` returned."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if model is None:
        raise ValueError("no_sync(model=None): pass the model; its DDP or FSDP2 wrapper is what synchronises gradients")
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    if wrapped:
        raise ValueError(
            f"no_sync: the {type(model).__name__} passed is neither DDP nor FSDP2; "
            "pass the model that booster.boost() returned"
        )
    return nullcontext()
