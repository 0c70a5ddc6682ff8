"""ColossalAI's ``LowLevelZeroPlugin`` (ZeRO-1/2) and ``GeminiPlugin`` (ZeRO-3 with offload), on FSDP2.

ColossalChat's training scripts offer ``zero2``, ``zero2_cpu``, ``gemini`` and ``gemini_auto``;
these classes take the same constructor arguments and run them with torch's ``fully_shard``:

* ``LowLevelZeroPlugin(stage=1|2)``: ``reshard_after_forward=False``: parameters are gathered
  once per step and stay whole through forward and backward, gradients are reduce-scattered
  and the optimizer state is sharded (ZeRO-2's communication; between steps the parameters are
  stored sharded too, so memory is at most ZeRO-2's). ``cpu_offload=True`` adds
  ``CPUOffloadPolicy`` (parameters, gradients and optimizer state on the CPU, the step there).
* ``GeminiPlugin``: ``reshard_after_forward=True`` (ZeRO-3); ``placement_policy="auto"`` or
  ``offload_optim_frac=1.0`` offload to the CPU with ``CPUOffloadPolicy``.

Both are :class:`~ckptio.plugins.fsdp.TorchFSDPPlugin` underneath: the optimizer built on the
unsharded model is rebound by name, its state (sharded per rank) is saved by parameter name as
full tensors, and checkpoints are the same Hugging Face folders as every other plugin's, so
they load at any world size, in one process and under any other plugin. Arguments of
ColossalAI's that have no FSDP2 counterpart are accepted at their defaults and raise
``NotImplementedError`` naming them otherwise; fp16 is refused (no loss scaling here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ckptio.plugins.fsdp import TorchFSDPPlugin
from ckptio.plugins.precision import (
    cast_parameters,
    check_max_norm,
    check_precision,
    clip_before_step,
    mixed_precision_policy,
    reject,
)

__all__ = ["GeminiPlugin", "LowLevelZeroPlugin"]


def _offload_policy(pin_memory: bool) -> Any:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=pin_memory and torch.cuda.is_available())  # pinning needs CUDA


class _PrecisionFSDPPlugin(TorchFSDPPlugin):
    """FSDP2 plus the dtype of the stored parameters and clipping in ``optimizer.step()``."""

    precision: str
    master_weights: bool
    max_norm: float
    norm_type: float

    def configure(self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any):
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            cast_parameters(model, self.precision, self.master_weights)
        model, optimizer, criterion, dataloader, lr_scheduler = super().configure(
            model, optimizer, criterion, dataloader, lr_scheduler
        )
        if optimizer is not None:
            clip_before_step(optimizer, self.max_norm, self.norm_type)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def _record_layout(self, **settings: Any) -> None:
        """What the manifest records about the saving job (for inspection; never checked on load)."""
        self._io.layout = {
            "plugin": type(self).__name__,
            "world_size": self.mesh.size(),
            **settings,
            "torch_version": torch.__version__,
        }


class LowLevelZeroPlugin(_PrecisionFSDPPlugin):
    """ZeRO stage 1 or 2 with ColossalAI's arguments, on FSDP2 (``reshard_after_forward=False``).

    Args:
        stage: 1 or 2. Both run as ZeRO-2 (gradients reduce-scattered, optimizer state
            sharded); parameters are also stored sharded between steps.
        precision: ``"bf16"`` (bf16 compute, fp32 master weights) or ``"fp32"``; ``"fp16"``
            (ColossalAI's default) raises ``NotImplementedError``: it needs loss scaling.
        initial_scale, min_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
            max_scale: fp16 loss scaling; as in ColossalAI they do nothing under bf16 and fp32.
        max_norm: clip the gradient norm to this in ``optimizer.step()`` (0: no clipping).
        norm_type: the norm of ``max_norm``.
        communication_dtype: dtype gradients are reduced in (default: the compute dtype).
        cpu_offload: parameters, gradients and optimizer state on the CPU (``CPUOffloadPolicy``).
        master_weights: with bf16, keep fp32 parameters (False: bf16 parameters and state).
        cast_inputs: cast floating-point inputs of ``forward`` to the compute dtype.
        verbose: accepted (nothing is printed).
        shard_classes: class names that become their own FSDP unit (default: a
            ``transformers`` model's ``_no_split_modules``); not a ColossalAI argument.

    ``reduce_bucket_size_in_m``, ``overlap_communication``, ``overlap_allgather`` (FSDP2 buckets
    per unit and overlaps on its own), ``use_fp8``, ``fp8_communication`` and ``extra_dp_size``
    raise ``NotImplementedError`` when set to anything but ColossalAI's default.
    """

    def __init__(
        self,
        stage: int = 1,
        precision: str = "fp16",
        initial_scale: float = 2**32,
        min_scale: float = 1,
        growth_factor: float = 2,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        max_scale: float = 2**32,
        max_norm: float = 0.0,
        norm_type: float = 2.0,
        reduce_bucket_size_in_m: int = 12,
        communication_dtype: torch.dtype | None = None,
        overlap_communication: bool = True,
        overlap_allgather: bool = False,
        cpu_offload: bool = False,
        master_weights: bool = True,
        verbose: bool = False,
        cast_inputs: bool = True,
        fp8_communication: bool = False,
        use_fp8: bool = False,
        extra_dp_size: int = 1,
        *,
        shard_classes: Iterable[str] | None = None,
    ) -> None:
        name = "LowLevelZeroPlugin"
        if stage not in (1, 2):
            raise ValueError(f"{name}(stage={stage!r}): ZeRO stage 1 or 2 (for stage 3 use GeminiPlugin)")
        check_precision(name, precision)
        check_max_norm(name, max_norm, norm_type)
        fsdp_own = "FSDP2 buckets gradients per sharded unit and overlaps communication itself; drop it"
        reject(name, "reduce_bucket_size_in_m", reduce_bucket_size_in_m, 12, fsdp_own)
        reject(name, "overlap_communication", overlap_communication, True, fsdp_own)
        reject(name, "overlap_allgather", overlap_allgather, False, fsdp_own)
        reject(name, "use_fp8", use_fp8, False, "fp8 training is not implemented; use precision='bf16'")
        reject(name, "fp8_communication", fp8_communication, False, "use communication_dtype=torch.bfloat16")
        reject(name, "extra_dp_size", extra_dp_size, 1, "for sharding inside nodes and replicating across them, "
               "use TorchFSDPPlugin(mesh=init_device_mesh(..., (replicas, shards)))")  # fmt: skip
        self.stage, self.precision, self.master_weights = stage, precision, master_weights
        self.max_norm, self.norm_type, self.verbose = max_norm, norm_type, verbose
        kwargs: dict[str, Any] = {"reshard_after_forward": False}
        policy = mixed_precision_policy(precision, reduce_dtype=communication_dtype, cast_inputs=cast_inputs)
        if policy is not None:
            kwargs["mp_policy"] = policy
        if cpu_offload:
            kwargs["offload_policy"] = _offload_policy(pin_memory=True)
        super().__init__(shard_classes=shard_classes, **kwargs)
        self.cpu_offload = cpu_offload
        self._record_layout(stage=stage, precision=precision, cpu_offload=cpu_offload)


class GeminiPlugin(_PrecisionFSDPPlugin):
    """ColossalAI's Gemini (ZeRO-3, optionally offloaded to the CPU) with its arguments, on FSDP2.

    Args:
        placement_policy: ``"static"`` (place as the ``*_frac`` arguments say) or ``"auto"``
            (offload to the CPU: ``CPUOffloadPolicy``).
        shard_param_frac: 1.0 (ZeRO-3: ``reshard_after_forward=True``) or 0.0 (ZeRO-2:
            ``False``); FSDP2 cannot shard a fraction.
        offload_optim_frac: 0.0 or 1.0: 1.0 offloads optimizer state, gradients and parameters
            (``CPUOffloadPolicy``); FSDP2 offloads all or nothing.
        offload_param_frac: 0.0 or 1.0, the latter only with ``offload_optim_frac=1.0``.
        precision: ``"bf16"`` (bf16 compute, fp32 master weights) or ``"fp32"`` (not in
            ColossalAI's Gemini); ``"fp16"`` (ColossalAI's default) raises ``NotImplementedError``.
        master_weights: with bf16, keep fp32 parameters (False: bf16 parameters and state).
        pin_memory, enable_async_reduce: pin the CPU copies when offloading (with CUDA);
            ColossalAI's ``enable_async_reduce`` implies ``pin_memory``.
        force_outputs_fp32: return ``forward``'s outputs in fp32.
        enable_gradient_accumulation: accepted either way: FSDP2 accumulates gradients over
            ``backward()`` calls until ``optimizer.zero_grad()``.
        strict_ddp_mode, verbose: accepted (pure data parallel; nothing is printed).
        initial_scale, min_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
            max_scale: fp16 loss scaling; as in ColossalAI they do nothing under bf16.
        max_norm, norm_type: clip the gradient norm in ``optimizer.step()`` (0: no clipping).
        shard_classes: class names that become their own FSDP unit (default: a
            ``transformers`` model's ``_no_split_modules``); not a ColossalAI argument.

    Gemini's chunk and placement-search arguments (``chunk_config_dict``, ``chunk_init_device``,
    ``max_prefetch``, ``warmup_non_model_data_ratio``, ``steady_cuda_cap_ratio``,
    ``search_range_m``, ``hidden_dim``, ``min_chunk_size_m``, ``memstats``,
    ``gpu_margin_mem_ratio``), Shardformer's (``tp_size``, ``extra_dp_size``,
    ``enable_*``) and fp8 raise ``NotImplementedError`` when set to anything but the default.
    """

    def __init__(
        self,
        chunk_config_dict: dict | None = None,
        chunk_init_device: torch.device | None = None,
        placement_policy: str = "static",
        enable_gradient_accumulation: bool = False,
        max_prefetch: int = 0,
        shard_param_frac: float = 1.0,
        offload_optim_frac: float = 0.0,
        offload_param_frac: float = 0.0,
        warmup_non_model_data_ratio: float = 0.8,
        steady_cuda_cap_ratio: float = 0.9,
        precision: str = "fp16",
        master_weights: bool = True,
        pin_memory: bool = False,
        force_outputs_fp32: bool = False,
        strict_ddp_mode: bool = False,
        search_range_m: int = 32,
        hidden_dim: int | None = None,
        min_chunk_size_m: float = 32,
        memstats: Any = None,
        gpu_margin_mem_ratio: float = 0.0,
        initial_scale: float = 2**16,
        min_scale: float = 1,
        growth_factor: float = 2,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        max_scale: float = 2**32,
        max_norm: float = 0.0,
        norm_type: float = 2.0,
        tp_size: int = 1,
        extra_dp_size: int = 1,
        enable_all_optimization: bool = False,
        enable_fused_normalization: bool = False,
        enable_flash_attention: bool = False,
        enable_sequence_parallelism: bool = False,
        enable_jit_fused: bool = False,
        enable_async_reduce: bool = True,
        use_fp8: bool = False,
        verbose: bool = False,
        fp8_communication: bool = False,
        *,
        shard_classes: Iterable[str] | None = None,
    ) -> None:
        name = "GeminiPlugin"
        check_precision(name, precision)
        check_max_norm(name, max_norm, norm_type)
        if placement_policy not in ("static", "auto"):
            raise ValueError(f"{name}(placement_policy={placement_policy!r}): expected 'static' or 'auto'")
        for arg, value in (("shard_param_frac", shard_param_frac), ("offload_optim_frac", offload_optim_frac),
                           ("offload_param_frac", offload_param_frac)):  # fmt: skip
            if value not in (0.0, 1.0):
                raise NotImplementedError(
                    f"{name}({arg}={value!r}) is not supported: FSDP2 shards and offloads every parameter or none; "
                    "use 0.0 or 1.0"
                )
        if offload_param_frac == 1.0 and offload_optim_frac != 1.0:
            raise NotImplementedError(
                f"{name}(offload_param_frac=1.0, offload_optim_frac={offload_optim_frac!r}) is not supported: FSDP2 "
                "offloads parameters together with their optimizer state; use offload_optim_frac=1.0"
            )
        if placement_policy == "auto":
            for arg, value, default in (("shard_param_frac", shard_param_frac, 1.0),
                                        ("offload_optim_frac", offload_optim_frac, 0.0),
                                        ("offload_param_frac", offload_param_frac, 0.0)):  # fmt: skip
                if value != default:
                    raise ValueError(f"{name}({arg}={value!r}) applies to placement_policy='static' only")
        no_chunks = "FSDP2 has no chunks or placement search; drop it"
        reject(name, "chunk_config_dict", chunk_config_dict, None, no_chunks)
        reject(name, "chunk_init_device", chunk_init_device, None, no_chunks)
        reject(name, "max_prefetch", max_prefetch, 0, no_chunks)
        reject(name, "warmup_non_model_data_ratio", warmup_non_model_data_ratio, 0.8, no_chunks)
        reject(name, "steady_cuda_cap_ratio", steady_cuda_cap_ratio, 0.9, no_chunks)
        reject(name, "search_range_m", search_range_m, 32, no_chunks)
        reject(name, "hidden_dim", hidden_dim, None, no_chunks)
        reject(name, "min_chunk_size_m", min_chunk_size_m, 32, no_chunks)
        reject(name, "memstats", memstats, None, no_chunks)
        reject(name, "gpu_margin_mem_ratio", gpu_margin_mem_ratio, 0.0, no_chunks)
        reject(name, "tp_size", tp_size, 1, "for tensor parallel x sharded data parallel, use "
               "HybridParallelPlugin(tp_size=...)")  # fmt: skip
        reject(name, "extra_dp_size", extra_dp_size, 1, "for sharding inside nodes and replicating across them, "
               "use TorchFSDPPlugin(mesh=init_device_mesh(..., (replicas, shards)))")  # fmt: skip
        no_shardformer = "ColossalAI's Shardformer kernels are not part of ckptio; "
        compile_instead = no_shardformer + "use torch.compile"
        reject(name, "enable_all_optimization", enable_all_optimization, False, compile_instead)
        reject(name, "enable_fused_normalization", enable_fused_normalization, False, compile_instead)
        reject(name, "enable_jit_fused", enable_jit_fused, False, compile_instead)
        reject(name, "enable_flash_attention", enable_flash_attention, False, no_shardformer + "load the model with "
               "attn_implementation='sdpa' or 'flash_attention_2' (transformers)")  # fmt: skip
        reject(name, "enable_sequence_parallelism", enable_sequence_parallelism, False, "sequence parallelism is "
               "not implemented")  # fmt: skip
        reject(name, "use_fp8", use_fp8, False, "fp8 training is not implemented; use precision='bf16'")
        reject(name, "fp8_communication", fp8_communication, False, "fp8 communication is not implemented")
        self.precision, self.master_weights = precision, master_weights
        self.max_norm, self.norm_type, self.verbose = max_norm, norm_type, verbose
        self.placement_policy = placement_policy
        self.enable_gradient_accumulation = enable_gradient_accumulation
        offload = placement_policy == "auto" or offload_optim_frac == 1.0
        kwargs: dict[str, Any] = {"reshard_after_forward": shard_param_frac == 1.0}
        policy = mixed_precision_policy(precision, output_dtype=torch.float32 if force_outputs_fp32 else None)
        if policy is not None:
            kwargs["mp_policy"] = policy
        if offload:
            kwargs["offload_policy"] = _offload_policy(pin_memory=pin_memory or enable_async_reduce)
        super().__init__(shard_classes=shard_classes, **kwargs)
        self.cpu_offload = offload
        self._record_layout(placement_policy=placement_policy, precision=precision, cpu_offload=offload)
