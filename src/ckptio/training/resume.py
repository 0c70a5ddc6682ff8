"""What a resume on a different number of ranks cannot restore, said as a warning.

Model, optimizer and scheduler state is saved as full tensors by name, so it reshards to
any world size. Per-rank state cannot: each rank's RNG streams (and a data position that
was per rank) belong to the saved rank of the same number.
"""

from __future__ import annotations

import warnings
from typing import Any


def world_size_change_message(saved: int, current: int) -> str:
    """The explanation for a resume from ``saved`` ranks onto ``current`` ranks."""
    matched = min(saved, current)
    parts = [
        f"checkpoint was saved on {saved} ranks and is loaded on {current}: model, optimizer and LR "
        "scheduler were resharded and restored in full, but per-rank state could not be matched:"
    ]
    if current > saved:
        parts.append(f"ranks {matched}..{current - 1} have no saved RNG state and keep their current RNG;")
    else:
        parts.append(f"the saved RNG states of ranks {matched}..{saved - 1} are not used;")
    parts.append(
        f"RNG states of ranks 0..{matched - 1} are restored, but the data each rank sees changes with the "
        "world size, so the resumed run is not bit-identical to an uninterrupted one"
    )
    return " ".join(parts)


def warn_if_world_size_changed(running: dict[str, Any], current: int, *, where: str = "") -> bool:
    """Warn (once per call) when ``running_states.json`` says another world size; True if so."""
    saved = running.get("world_size")
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1 or saved == current:
        return False
    prefix = f"{where}: " if where else ""
    warnings.warn(prefix + world_size_change_message(saved, current), UserWarning, stacklevel=3)
    return True
