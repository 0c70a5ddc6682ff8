"""Every file name ckptio writes or recognises, defined in one place.

Names follow Hugging Face (``model-00001-of-00004.safetensors``) and ColossalAI's prefix
rule (the prefix goes before the last extension: ``pytorch_model.ema.bin``,
``model.safetensors.index.ema.json``). Parsing uses anchored regexes only.
"""

from __future__ import annotations

import re

SAFETENSORS_WEIGHTS = "model.safetensors"
BIN_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
MANIFEST = "ckptio_manifest.json"
# peft's adapter folder (PeftModel.save_pretrained / from_pretrained): weights + config; an
# adapter other than "default" sits in a subfolder named after it
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
# a training checkpoint, ColossalChat's layout: epoch-E_step-S/ with these inside
TRAINING_MODEL_DIR = "modeling"
TRAINING_OPTIMIZER_DIR = "optimizer"
TRAINING_LR_SCHEDULER = "lr_scheduler"
RUNNING_STATES = "running_states.json"
RNG_DIR = "rng_state"
# objects with state_dict()/load_state_dict() saved with a training checkpoint: stateful/<name>.json + .safetensors
STATEFUL_DIR = "stateful"
# torch's state_dict() key of a module's get_extra_state() (nn.modules.module._EXTRA_STATE_KEY_SUFFIX)
EXTRA_STATE_SUFFIX = "_extra_state"
# ckptio's optimizer layout: safetensors shards of state tensors keyed `<param>/<state>` + a JSON index
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_INDEX = "optimizer.index.json"
# ColossalAI's optimizer layout: pickled shards without `-of-N`, a group file, an index
COLOSSAL_OPTIM_STATES = "pytorch_optim.bin"
COLOSSAL_OPTIM_INDEX = "pytorch_optim.bin.index.json"
COLOSSAL_OPTIM_GROUPS = "pytorch_optim_group.bin"
# ... and what ColossalAI 0.5 writes with use_async=True: safetensors shards `optimizer-00001.safetensors`
# (flat keys, see formats/colossal_optim.py) under this index, with the same group file
COLOSSAL_OPTIM_SAFE_INDEX = "optimizer.safetensors.index.json"
# torch.distributed.checkpoint (DCP): a folder of `__<rank>_<n>.distcp` data files and the pickled
# `.metadata` that maps every tensor's chunks to them; torchtitan keeps one per `step-<N>/` folder
DCP_METADATA = ".metadata"
DCP_DATA_SUFFIX = ".distcp"
_TORCHTITAN_STEP_RE = re.compile(r"^step-(\d+)$")

# Training folders written by other tools (loaded by ckptio.training.load_checkpoint).
# transformers.Trainer's `checkpoint-N/`: the model as save_pretrained writes it, and these
HF_TRAINER_STATE = "trainer_state.json"
HF_TRAINER_OPTIMIZER = "optimizer.pt"
HF_TRAINER_SCHEDULER = "scheduler.pt"
HF_TRAINER_RNG = "rng_state.pth"  # one process; `rng_state_<process index>.pth` on several
# accelerate's `Accelerator.save_state(dir)` (accelerate/utils/constants.py): the first model, optimizer and
# scheduler are `model.safetensors` / `pytorch_model.bin`, `optimizer.bin`, `scheduler.bin` (the i-th: `_i`
# before the extension), and every process writes `random_states_<process index>.pkl` (a torch.save file)
ACCELERATE_OPTIMIZER = "optimizer.bin"
ACCELERATE_SCHEDULER = "scheduler.bin"
# ckptio.integrations.lightning: a Lightning checkpoint as a folder (the model's weights under the names above)
LIGHTNING_DOCUMENT = "lightning_checkpoint.json"  # everything but tensors, as tagged JSON
LIGHTNING_STATE_WEIGHTS = "state.safetensors"  # the other tensors: state-00001-of-0000N.safetensors
LIGHTNING_STATE_INDEX = "state.safetensors.index.json"

# Temporaries are hidden siblings: `.NAME.ckptio-tmp-TOKEN` (being written),
# `.NAME.ckptio-old-TOKEN` (a replaced checkpoint, deleted right after the commit; put back by
# recovery if a crash hit before the new one was in place) and `.NAME.ckptio-del-TOKEN` (a
# checkpoint being deleted, e.g. by rotation: never put back, removed by the next save).
TMP_MARK = ".ckptio-tmp-"
OLD_MARK = ".ckptio-old-"
DELETE_MARK = ".ckptio-del-"

# Object stores (fsspec URLs) have no atomic rename: a folder save writes its files under a
# fresh `ckptio-v-TOKEN/` sub-prefix and then the commit marker, LAST, naming that version.
COMMIT_MARKER = "_CKPTIO_COMMITTED"
REMOTE_VERSION_PREFIX = "ckptio-v-"

SINGLE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_INDEX_RE = re.compile(r"^[^/\\]+\.index(?:\.[^./\\]+)?\.json$")
# Model indexes only: Hugging Face's two names, with ColossalAI's optional `.PREFIX` before `.json`.
_MODEL_INDEX_RE = re.compile(r"^(?:model\.safetensors|pytorch_model\.bin)\.index(?:\.[^./\\]+)?\.json$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_prefix(prefix: str | None) -> str | None:
    """A prefix becomes part of file names, so it may not contain dots or path separators."""
    if prefix is None or prefix == "":
        return None
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
    return prefix


def add_prefix(name: str, prefix: str | None) -> str:
    """``pytorch_model.bin`` + ``ema`` -> ``pytorch_model.ema.bin`` (ColossalAI's rule)."""
    if not prefix:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{prefix}.{ext}"


def weights_name(use_safetensors: bool, prefix: str | None = None) -> str:
    return add_prefix(SAFETENSORS_WEIGHTS if use_safetensors else BIN_WEIGHTS, prefix)


def index_name(use_safetensors: bool, prefix: str | None = None) -> str:
    return add_prefix(SAFETENSORS_INDEX if use_safetensors else BIN_INDEX, prefix)


def shard_name(weights: str, index: int, total: int) -> str:
    """Shard ``index`` (0-based) of ``total``: ``model-00001-of-00004.safetensors``."""
    stem, _, ext = weights.rpartition(".")
    return f"{stem}-{index + 1:05d}-of-{total:05d}.{ext}"


def is_index_file(name: str) -> bool:
    """Any index JSON (model or optimizer): for a path the user names explicitly."""
    return bool(_INDEX_RE.match(name))


def is_model_index(name: str) -> bool:
    """A model index (``model.safetensors.index[.PREFIX].json``, ``pytorch_model.bin.index[.PREFIX].json``).

    Folder detection uses this, not :func:`is_index_file`: a folder may also hold an optimizer
    index (``optimizer.index.json``, ``pytorch_optim.bin.index.json``), which ``transformers``
    ignores and so must we.
    """
    return bool(_MODEL_INDEX_RE.match(name))


def safetensors_twin(index: str) -> str:
    """The safetensors model index with the same prefix as ``index``
    (``pytorch_model.bin.index.ema.json`` -> ``model.safetensors.index.ema.json``); a safetensors
    index is its own twin. Hugging Face repositories often ship both formats."""
    bin_stem, st_stem = BIN_INDEX.removesuffix(".json"), SAFETENSORS_INDEX.removesuffix(".json")
    return st_stem + index[len(bin_stem) :] if index.startswith(bin_stem) else index


_OPTIMIZER_INDEX_RE = re.compile(r"^optimizer\.index(?:\.[A-Za-z0-9_\-]+)?\.json$")
_COLOSSAL_OPTIM_INDEX_RE = re.compile(
    r"^(?:pytorch_optim\.bin|optimizer\.safetensors)\.index(?:\.[A-Za-z0-9_\-]+)?\.json$"
)


def is_optimizer_index(name: str) -> bool:
    """ckptio's optimizer index (``optimizer.index[.PREFIX].json``)."""
    return bool(_OPTIMIZER_INDEX_RE.match(name))


def is_colossal_optimizer_index(name: str) -> bool:
    """ColossalAI's optimizer index (``pytorch_optim.bin.index[.PREFIX].json``, or
    ``optimizer.safetensors.index[.PREFIX].json`` for its safetensors shards)."""
    return bool(_COLOSSAL_OPTIM_INDEX_RE.match(name))


def optimizer_weights_name(prefix: str | None = None) -> str:
    return add_prefix(OPTIMIZER_WEIGHTS, prefix)


def optimizer_index_name(prefix: str | None = None) -> str:
    return add_prefix(OPTIMIZER_INDEX, prefix)


def colossal_optimizer_names(prefix: str | None = None) -> tuple[str, str, str]:
    """``(states_name, index_name, group_file)`` of ColossalAI's layout for a prefix."""
    return (
        add_prefix(COLOSSAL_OPTIM_STATES, prefix),
        add_prefix(COLOSSAL_OPTIM_INDEX, prefix),
        add_prefix(COLOSSAL_OPTIM_GROUPS, prefix),
    )


def colossal_shard_name(states_name: str, index: int) -> str:
    """ColossalAI numbers optimizer shards without ``-of-N``: ``pytorch_optim-00001.bin``."""
    return states_name.replace(".bin", f"-{index + 1:05d}.bin")


def stateful_file_names(name: str) -> tuple[str, str]:
    """``(JSON, tensors)`` files of a stateful object ``name`` (letters, digits, ``_``, ``-``) in a
    training checkpoint: ``stateful/ema.json``, ``stateful/ema.safetensors``."""
    return f"{STATEFUL_DIR}/{name}.json", f"{STATEFUL_DIR}/{name}.safetensors"


def rng_file_name(rank: int) -> str:
    """The per-rank RNG file inside a training checkpoint: ``rng_state/rank_00000.json``."""
    return f"{RNG_DIR}/rank_{rank:05d}.json"


_HF_RNG_RE = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
_ACCELERATE_RNG_RE = re.compile(r"^random_states_(\d+)\.pkl$")
# transformers.Trainer names its checkpoints `checkpoint-<global step>`; accelerate's automatic naming
# (ProjectConfiguration(automatic_checkpoint_naming=True)) `checkpoints/checkpoint_<save count>`
_FOREIGN_CHECKPOINT_RE = re.compile(r"^checkpoint[-_](\d+)$")


def hf_rng_file_name(process_index: int | None) -> str:
    """transformers.Trainer's RNG file: ``rng_state.pth`` (one process, None) or ``rng_state_<i>.pth``."""
    return HF_TRAINER_RNG if process_index is None else f"rng_state_{process_index}.pth"


def accelerate_rng_file_name(process_index: int) -> str:
    """accelerate's per-process RNG file: ``random_states_<i>.pkl``."""
    return f"random_states_{process_index}.pkl"


def is_hf_rng_file(name: str) -> bool:
    return _HF_RNG_RE.match(name) is not None


def is_accelerate_rng_file(name: str) -> bool:
    return _ACCELERATE_RNG_RE.match(name) is not None


def parse_foreign_checkpoint_name(name: str) -> int | None:
    """The number of a ``checkpoint-N`` (transformers.Trainer) or ``checkpoint_N`` (accelerate) folder, or None."""
    match = _FOREIGN_CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


_CHECKPOINT_NAME_RE = re.compile(r"^epoch-(\d+)_step-(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    """A training checkpoint's folder name: ``epoch-E_step-S`` (ColossalChat's)."""
    return f"epoch-{epoch}_step-{step}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` of a folder named by :func:`checkpoint_name`, or None for any other name."""
    match = _CHECKPOINT_NAME_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def model_files_pattern(prefix: str | None) -> re.Pattern[str]:
    """Every model-weight file a save with this prefix owns, in either format.

    A new save replaces all of them, so switching from ``.bin`` to safetensors, or to fewer
    shards, leaves no stale file behind. Files of other prefixes do not match.
    """
    p = re.escape(f".{prefix}") if prefix else ""
    return re.compile(
        rf"^(?:(?:model|pytorch_model){p}(?:-\d{{5}}(?:-of-\d{{5}})?)?\.(?:safetensors|bin)"
        rf"|(?:model\.safetensors|pytorch_model\.bin)\.index{p}\.json)$"
    )


def optimizer_files_pattern(prefix: str | None) -> re.Pattern[str]:
    """Every optimizer file a sharded save with this prefix replaces, in either layout."""
    p = re.escape(f".{prefix}") if prefix else ""
    states, index, groups = (re.escape(n) for n in colossal_optimizer_names(prefix))
    colossal_stem = states[: -len(re.escape(".bin"))]
    safe_index = re.escape(add_prefix(COLOSSAL_OPTIM_SAFE_INDEX, prefix))
    return re.compile(
        rf"^(?:optimizer{p}(?:-\d{{5}}(?:-of-\d{{5}})?)?\.safetensors|optimizer\.index{p}\.json"
        rf"|{index}|{safe_index}|{groups}|{colossal_stem}-\d{{5}}\.bin)$"
    )


def is_temporary(name: str) -> bool:
    return TMP_MARK in name or OLD_MARK in name or DELETE_MARK in name


def parse_torchtitan_step(name: str) -> int | None:
    """The step of a torchtitan checkpoint folder name (``step-1000`` -> 1000), else None."""
    m = _TORCHTITAN_STEP_RE.match(name)
    return int(m.group(1)) if m else None
