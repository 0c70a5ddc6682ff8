"""HybridParallelPlugin: tensor parallel inside a ``tp`` group x FSDP2 data parallel across
``dp``, on one 2-D ``DeviceMesh`` (``("dp", "tp")``), with PyTorch's own DTensor APIs; with
``pp_size > 1``, pipeline stages outermost (``("pp", "dp", "tp")``), each stage a contiguous
slice of the decoder run by ``torch.distributed.pipelining`` (:mod:`ckptio.plugins.pipeline`).

Tensor parallel is :func:`torch.distributed.tensor.parallel.parallelize_module` with a plan
``{module-name pattern: ParallelStyle}`` (patterns use ``fnmatch``: ``*`` matches any
characters, dots included). The user passes one, or gets the default plan of a known
``transformers`` decoder (:func:`default_tp_plan`). Data parallel is ``fully_shard`` over the
``dp`` dimension. Every parameter is then a DTensor whose placements say which box of the
full tensor each rank holds, so checkpoints need no layout code of their own: they go
through :class:`~ckptio.checkpoint_io.distributed.DistributedCheckpointIO` and load on any
other ``(dp, tp)``, in one process, or in ``transformers``. Pipeline stages hold different keys
under the full model's names; their IO saves the union into the same one folder.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.distributed import DistributedCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.plugins.fsdp import default_shard_classes, rebind_optimizer
from ckptio.plugins.pipeline import STYLES, PipelineRunner, batch_parts, check_pipeline_model, split_stage
from ckptio.plugins.precision import (
    cast_parameters,
    check_max_norm,
    check_precision,
    clip_before_step,
    mixed_precision_policy,
)
from ckptio.plugins.process_group import device_type, ensure_process_group, local_device

__all__ = ["HybridParallelPlugin", "default_tp_plan", "gpt2_tp_plan", "llama_tp_plan"]


# ----------------------------------------------------------------------------- plans


def llama_tp_plan() -> dict[str, Any]:
    """Megatron-style plan for Llama decoder layers: q/k/v and gate/up column-wise, o/down
    row-wise, so each layer needs one all-reduce in attention and one in the MLP.
    Embeddings, norms and ``lm_head`` stay replicated over ``tp`` (no vocabulary padding)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {
        "*layers.*.self_attn.q_proj": col,
        "*layers.*.self_attn.k_proj": col,
        "*layers.*.self_attn.v_proj": col,
        "*layers.*.self_attn.o_proj": row,
        "*layers.*.mlp.gate_proj": col,
        "*layers.*.mlp.up_proj": col,
        "*layers.*.mlp.down_proj": row,
    }


def gpt2_tp_plan() -> dict[str, Any]:
    """GPT-2's MLP only: ``c_fc`` column-wise and ``c_proj`` row-wise.

    GPT-2 uses ``transformers``' ``Conv1D`` (weight stored transposed, ``(in, out)``), which
    torch's ``ColwiseParallel`` / ``RowwiseParallel`` refuse, so the plan uses
    :class:`Conv1DColwise` / :class:`Conv1DRowwise`, which shard the transposed dims. The
    attention's fused ``c_attn`` (q, k and v concatenated in one output dim) is left
    replicated: a contiguous column split would hand a rank parts of q and k, not whole heads.
    """
    return {"*h.*.mlp.c_fc": Conv1DColwise(), "*h.*.mlp.c_proj": Conv1DRowwise()}


_DEFAULT_PLANS = {"llama": llama_tp_plan, "gpt2": gpt2_tp_plan}


def default_tp_plan(model: nn.Module) -> dict[str, Any]:
    """The built-in plan for a ``transformers`` model by ``config.model_type`` (``llama``,
    ``gpt2``); raises ``ValueError`` for anything else (pass ``tp_plan=`` then)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    make = _DEFAULT_PLANS.get(model_type)
    if make is None:
        raise ValueError(
            f"no default tensor-parallel plan for {type(model).__name__} (model_type={model_type!r}); "
            f"pass tp_plan={{'module.name.pattern': ColwiseParallel() / RowwiseParallel(), ...}} "
            f"(built in: {sorted(_DEFAULT_PLANS)})"
        )
    return make()


def _conv1d_styles():
    """Column / row-wise styles for ``transformers``' ``Conv1D`` (``y = x @ W + b`` with
    ``W`` of shape ``(in, out)``): the same runtime as torch's Linear styles, with the
    weight's sharded dimension swapped."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def shard(module: nn.Module, mesh, placements: dict[str, Any], src_rank: int | None) -> None:
        for name, placement in placements.items():
            param = getattr(module, name, None)
            if param is not None:
                dist_param = distribute_tensor(param, mesh, [placement], src_data_rank=src_rank)
                module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    class Colwise(ColwiseParallel):
        """Column-wise ``Conv1D``: weight ``Shard(1)``, bias ``Shard(0)``."""

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            return distribute_module(
                module,
                device_mesh,
                lambda _n, m, mesh: shard(m, mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank),
                lambda m, inputs, mesh: self._prepare_input_fn(
                    self.input_layouts, self.desired_input_layouts, m, inputs, mesh
                ),
                lambda m, outputs, mesh: self._prepare_output_fn(
                    self.output_layouts, self.use_local_output, m, outputs, mesh
                ),
            )

    class Rowwise(RowwiseParallel):
        """Row-wise ``Conv1D``: weight ``Shard(0)``, bias replicated."""

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module,
                device_mesh,
                lambda _n, m, mesh: shard(m, mesh, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank),
                lambda m, inputs, mesh: self._prepare_input_fn(
                    self.input_layouts, self.desired_input_layouts, m, inputs, mesh
                ),
                lambda m, outputs, mesh: self._prepare_output_fn(
                    self.output_layouts, self.use_local_output, m, outputs, mesh
                ),
            )

    return Colwise, Rowwise


def Conv1DColwise() -> Any:  # noqa: N802 (reads like the style class it returns)
    """A column-wise ``ParallelStyle`` for ``transformers``' ``Conv1D``."""
    return _conv1d_styles()[0]()


def Conv1DRowwise() -> Any:  # noqa: N802
    """A row-wise ``ParallelStyle`` for ``transformers``' ``Conv1D``."""
    return _conv1d_styles()[1]()


def _sharded_dims(module: nn.Module, style: Any) -> list[tuple[str, int]]:
    """``(what, size)`` pairs that must divide by ``tp_size`` for ``style`` on ``module``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    colwise = isinstance(style, ColwiseParallel)
    if not (colwise or isinstance(style, RowwiseParallel)):
        return []
    if isinstance(module, nn.Linear):
        return [("out_features", module.out_features)] if colwise else [("in_features", module.in_features)]
    if isinstance(module, nn.Embedding):
        return [("embedding_dim", module.embedding_dim)] if colwise else [("num_embeddings", module.num_embeddings)]
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # weight (in, out)
        return [("out_features", weight.shape[1])] if colwise else [("in_features", weight.shape[0])]
    return []


def resolve_tp_plan(model: nn.Module, plan: Mapping[str, Any], tp_size: int) -> dict[str, Any]:
    """``{module name: style}`` for every module a pattern of ``plan`` matches.

    Raises ``ValueError`` when a pattern matches nothing (a typo would otherwise train
    without tensor parallelism) or a sharded dimension is not divisible by ``tp_size``.
    """
    names = [name for name, _ in model.named_modules() if name]
    resolved: dict[str, Any] = {}
    for pattern, style in plan.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"tensor-parallel plan pattern {pattern!r} matches no module of {type(model).__name__}")
        for name in hits:
            resolved[name] = style
    problems = []
    for name, style in resolved.items():
        for what, size in _sharded_dims(model.get_submodule(name), style):
            if size % tp_size:
                problems.append(f"{name}.{what}={size}")
    config = getattr(model, "config", None)
    for attr in ("num_attention_heads", "num_key_value_heads", "n_head"):
        heads = getattr(config, attr, None)
        if isinstance(heads, int) and heads % tp_size and any("attn" in n for n in resolved):
            problems.append(f"config.{attr}={heads}")
    if problems:
        raise ValueError(
            f"tp_size={tp_size} does not divide {', '.join(problems[:8])}: tensor parallel needs every sharded "
            "dimension (and the attention head counts) divisible by tp_size; choose another tp_size or plan"
        )
    return resolved


# ----------------------------------------------------------------------------- plugin


class HybridParallelPlugin(Plugin):
    """Tensor parallel x FSDP2 data parallel on a 2-D ``("dp", "tp")`` ``DeviceMesh``, and
    pipeline stages on a ``("pp", "dp", "tp")`` one when ``pp_size > 1``.

    Args:
        tp_size: ranks per tensor-parallel group (neighbouring ranks: put them in one node).
        pp_size: pipeline stages (outermost mesh dimension). Above 1, ``boost()`` keeps on each
            rank a contiguous slice of a ``transformers`` Llama decoder's layers (embeddings on the
            first stage, final norm and ``lm_head`` on the last; tied embeddings are refused),
            under the full model's parameter names, and training steps go through
            :meth:`execute_pipeline`.
        dp_size: data-parallel size; default ``world_size // (pp_size * tp_size)``.
            ``pp_size * dp_size * tp_size`` must equal the world size.
        tp_plan: ``{module-name pattern: ParallelStyle}``; default :func:`default_tp_plan`
            (Llama and GPT-2 ``transformers`` models).
        shard_classes: class names that become their own FSDP unit (default: the model's
            ``_no_split_modules``); the root is always sharded last.
        fsdp_kwargs: passed to every ``fully_shard`` call.
        precision: ``"fp32"`` (the model's own dtypes; ColossalAI's default is ``"fp16"``, which
            raises ``NotImplementedError``: it needs loss scaling) or ``"bf16"``: FSDP2's
            ``MixedPrecisionPolicy`` over ``dp`` (bf16 compute, fp32 master weights).
        zero_stage: ColossalAI's 0, 1 or 2. Data parallel is always FSDP2, which shards
            parameters, gradients and optimizer state (at most the memory of any stage, the same
            updates); 1 and 2 keep parameters whole from forward to backward
            (``reshard_after_forward=False``: one all-gather per step, as ZeRO-1/2), 0 reshards
            after forward.
        max_norm: clip the gradient norm to this in ``optimizer.step()`` (0: no clipping).
        norm_type: the norm clipped (2: Euclidean; ``inf``: the largest value).
        num_microbatches: micro-batches per pipeline step (default: ``batch // microbatch_size``
            when that is given, else ``pp_size``).
        microbatch_size: sequences per micro-batch (used when ``num_microbatches`` is None).
        pp_style: the pipeline schedule: ``"1f1b"`` (ColossalAI's default; ``Schedule1F1B``) or
            ``"gpipe"`` (``ScheduleGPipe``).

    ``boost()`` accepts the model and optimizer as built for one process; the optimizer is
    rebound by parameter name to the sharded parameters, keeping every group's settings.
    Checkpoints are Hugging Face folders of full tensors (each written by one owner rank,
    balanced by bytes) and record the mesh in their manifest for inspection only. With pipeline
    stages each key is written by the stage holding it, into the same one folder (and optimizer
    state by parameter name): it loads at any other ``(pp, dp, tp)``, in one process and in
    ``transformers``. Pipeline saves are synchronous (``use_async`` is accepted and waits).
    """

    def __init__(
        self,
        tp_size: int,
        pp_size: int = 1,
        *,
        dp_size: int | None = None,
        tp_plan: Mapping[str, Any] | None = None,
        shard_classes: Iterable[str] | None = None,
        fsdp_kwargs: dict[str, Any] | None = None,
        precision: str = "fp32",
        zero_stage: int = 0,
        max_norm: float = 0.0,
        norm_type: float = 2.0,
        num_microbatches: int | None = None,
        microbatch_size: int | None = None,
        pp_style: str = "1f1b",
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        check_precision("HybridParallelPlugin", precision)
        check_max_norm("HybridParallelPlugin", max_norm, norm_type)
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"HybridParallelPlugin(zero_stage={zero_stage!r}): expected 0, 1 or 2")
        derived: dict[str, Any] = {}
        if zero_stage:
            derived["reshard_after_forward"] = False
        policy = mixed_precision_policy(precision)
        if policy is not None:
            derived["mp_policy"] = policy
        clash = sorted(set(derived) & set(fsdp_kwargs or {}))
        if clash:
            raise ValueError(
                f"HybridParallelPlugin: fsdp_kwargs sets {clash}, which precision={precision!r} / "
                f"zero_stage={zero_stage!r} also set; pass one or the other"
            )
        for name, value in (("tp_size", tp_size), ("pp_size", pp_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("num_microbatches", num_microbatches), ("microbatch_size", microbatch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if pp_style not in STYLES:
            raise ValueError(f"pp_style={pp_style!r}: expected one of {list(STYLES)}")
        ensure_process_group()
        world = dist.get_world_size()
        if dp_size is None:
            if world % (tp_size * pp_size):
                what = f"tp_size={tp_size}" if pp_size == 1 else f"pp_size * tp_size = {pp_size} * {tp_size}"
                raise ValueError(f"world size {world} is not divisible by {what}")
            dp_size = world // (tp_size * pp_size)
        if pp_size * dp_size * tp_size != world:
            sizes = (
                f"dp_size * tp_size = {dp_size} * {tp_size}"
                if pp_size == 1
                else (f"pp_size * dp_size * tp_size = {pp_size} * {dp_size} * {tp_size}")
            )
            raise ValueError(f"{sizes} = {pp_size * dp_size * tp_size} != world size {world}")
        local_device()  # binds this rank's GPU before the mesh is built (a no-op on CPU)
        self.dp_size, self.tp_size, self.pp_size = dp_size, tp_size, pp_size
        if pp_size == 1:
            self.mesh = init_device_mesh(device_type(), (dp_size, tp_size), mesh_dim_names=("dp", "tp"))
            self.stage = 0
        else:
            shape = (pp_size, dp_size, tp_size)
            self.mesh = init_device_mesh(device_type(), shape, mesh_dim_names=("pp", "dp", "tp"))
            self.stage = self.mesh.get_local_rank("pp")
        self.num_microbatches, self.microbatch_size, self.pp_style = num_microbatches, microbatch_size, pp_style
        self.tp_plan = None if tp_plan is None else dict(tp_plan)
        self.shard_classes = None if shard_classes is None else set(shard_classes)
        self.fsdp_kwargs = {**derived, **(fsdp_kwargs or {})}
        self.precision, self.zero_stage, self.max_norm, self.norm_type = precision, zero_stage, max_norm, norm_type
        self._io = DistributedCheckpointIO(layout=self.layout(), keys_differ=pp_size > 1)

    def layout(self) -> dict[str, Any]:
        """What the checkpoint records about how it was saved (never checked on load)."""
        return {
            "plugin": type(self).__name__,
            "mesh_shape": dict(zip(self.mesh.mesh_dim_names, self.mesh.shape)),
            "torch_version": torch.__version__,
        }

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply the tensor-parallel plan on ``tp``, then ``fully_shard`` on ``dp``.

        Args:
            model: the model on this rank's device; parallelized in place and returned.
        """
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        if self.tp_size > 1:
            plan = self.tp_plan if self.tp_plan is not None else default_tp_plan(model)
            for name, style in resolve_tp_plan(model, plan, self.tp_size).items():
                parallelize_module(model.get_submodule(name), self.mesh["tp"], copy.deepcopy(style))
        if self.dp_size > 1 or "mp_policy" in self.fsdp_kwargs:  # FSDP2 also carries the mixed precision
            dp_mesh = self.mesh["dp"]
            classes = self.shard_classes if self.shard_classes is not None else default_shard_classes(model)
            for module in list(model.modules())[1:]:
                if type(module).__name__ in classes:
                    fully_shard(module, mesh=dp_mesh, **self.fsdp_kwargs)
            fully_shard(model, mesh=dp_mesh, **self.fsdp_kwargs)
        return model

    def configure(self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any):
        if not getattr(model, "_ckptio_hybrid", False):
            old_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            if self.pp_size > 1:
                check_pipeline_model(model, self.pp_size)
                if optimizer is not None and any(optimizer.state.values()):
                    raise ValueError(
                        "the optimizer already has state (it has stepped); boost() it before the first optimizer.step()"
                    )
                split_stage(model, self.stage, self.pp_size)  # names stay the full model's
            cast_parameters(model, self.precision, master_weights=True)
            model = self.parallelize(model.to(local_device()))
            model._ckptio_hybrid = True
            if self.pp_size > 1:
                group = self.mesh["pp"].get_group()
                model._ckptio_pipeline = PipelineRunner(
                    model, self.stage, self.pp_size, group, local_device(), self.pp_style
                )  # fmt: skip
            if optimizer is not None:
                rebind_optimizer(optimizer, old_names, model, drop_absent=self.pp_size > 1)
        if optimizer is not None:
            clip_before_step(optimizer, self.max_norm, self.norm_type)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def no_sync(self, model: nn.Module, optimizer: Any = None):
        """Gradient accumulation without the data-parallel reduction (FSDP2's
        ``set_requires_gradient_sync``); at ``dp_size=1`` there is none to skip."""
        from torch.distributed.fsdp import FSDPModule

        from ckptio.plugins.precision import no_sync

        if getattr(model, "_ckptio_hybrid", False) and not isinstance(model, FSDPModule):
            return nullcontext()
        return no_sync(model)

    def execute_pipeline(
        self,
        data_iter: Iterator[Any],
        model: nn.Module,
        criterion: Callable[[Any, Any], torch.Tensor],
        optimizer: Any = None,
        return_loss: bool = True,
        return_outputs: bool = False,
    ) -> dict[str, Any]:
        """Forward and backward of one batch through every pipeline stage (ColossalAI's call);
        then ``optimizer.step()`` and ``optimizer.zero_grad()`` on every rank, as usual.

        Every rank of the step calls it and draws the next batch from ``data_iter`` (ranks of
        one data-parallel replica must draw the same batch): a dict with ``input_ids`` and
        ``labels``, an ``(inputs, labels)`` pair, or a tensor (its own labels). The batch is
        cut into micro-batches; the last stage calls ``criterion(outputs, labels)`` on each
        (``outputs``: the logits; ColossalAI passes the model's output object and the
        micro-batch dict instead) and gradients are those of the mean over micro-batches.

        Args:
            data_iter: an iterator of batches.
            model: the boosted model (this rank's stage).
            criterion: ``(logits, labels) -> scalar loss`` of one micro-batch.
            optimizer: the boosted optimizer (accepted for ColossalAI's signature; not stepped).
            return_loss: return the loss (on the last stage; None on the others).
            return_outputs: return the last stage's logits of the whole batch.

        Returns:
            ``{"loss": tensor or None, "outputs": tensor or None}``.
        """
        runner = getattr(model, "_ckptio_pipeline", None)
        if runner is None:
            raise ValueError("execute_pipeline needs a model boosted by HybridParallelPlugin(pp_size > 1)")
        inputs, labels = batch_parts(next(data_iter))
        batch = int(inputs.shape[0])
        if self.num_microbatches is not None:
            microbatches = self.num_microbatches
        elif self.microbatch_size is not None:
            microbatches = max(1, batch // self.microbatch_size)
        else:
            microbatches = self.pp_size
        if batch % microbatches:
            raise ValueError(f"a batch of {batch} sequences does not split into {microbatches} equal micro-batches")
        device = local_device()
        out = runner.run(inputs.to(device), labels.to(device), criterion, microbatches, return_outputs)
        if not return_loss:
            out["loss"] = None
        return out

    def get_checkpoint_io(self) -> CheckpointIO:
        return self._io
