"""Comparing the tensors of two model checkpoints, in any formats and layouts, as data."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ckptio.storage.location import readable
from ckptio.tools.inspect import dtype_name
from ckptio.tools.view import ModelView

# the 16 values of a 4-bit E2M1 code; torch has no arithmetic on float4_e2m1fn_x2 (two codes per byte)
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _unpack_fp4(t: torch.Tensor) -> torch.Tensor:
    codes = t.contiguous().view(torch.uint8).long()
    return torch.stack([_E2M1[codes & 15], _E2M1[codes >> 4]], dim=-1)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|`` (NaN where exactly one side is NaN; both NaN counts as equal)."""
    if a.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        a, b = _unpack_fp4(a), _unpack_fp4(b)
    if a.dtype == torch.bool:
        return float((a != b).any())
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    wide = torch.float64 if a.dtype in (torch.float64, torch.int64, torch.int32, torch.uint64) else torch.float32
    x, y = a.to(wide), b.to(wide)
    both_nan = torch.isnan(x) & torch.isnan(y)
    d = (x - y).abs().masked_fill(both_nan, 0)
    if d.numel() == 0:
        return 0.0
    return float(d.max())


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0) -> dict[str, Any]:
    """Keys only in one side, dtype/shape mismatches and the largest absolute difference per tensor.

    ``equal`` is True only when both hold the same keys, dtypes and shapes and every value is
    equal (or within ``atol``). Tensors are read one pair at a time.

    Args:
        a: a model checkpoint in any layout, local or an fsspec URL.
        b: another one.
        atol: the largest absolute difference still counted as equal.

    Returns:
        A dict ``json.dumps`` accepts (what ``ckptio diff --json`` prints).
    """
    with readable(a) as la, readable(b) as lb, ModelView(la) as va, ModelView(lb) as vb:
        report = compare(va, vb, atol)
    report.update({"a": os.fspath(a), "b": os.fspath(b), "atol": atol})
    return report


def compare(va: ModelView, vb: ModelView, atol: float) -> dict[str, Any]:
    only_a = sorted(set(va.tensors) - set(vb.tensors))
    only_b = sorted(set(vb.tensors) - set(va.tensors))
    mismatched, different, identical, worst = [], [], 0, 0.0
    common = [k for k in va.keys_in_file_order() if k in vb.tensors]
    for key in common:
        ea, eb = va.tensors[key], vb.tensors[key]
        if ea.dtype != eb.dtype or ea.shape != eb.shape:
            mismatched.append(
                {
                    "name": key,
                    "a": f"{dtype_name(ea.dtype)}{list(ea.shape)}",
                    "b": f"{dtype_name(eb.dtype)}{list(eb.shape)}",
                }
            )
            continue
        ta, tb = va.read(key), vb.read(key)
        d = max_abs_diff(ta, tb)
        del ta, tb
        worst = max(worst, d) if not math.isnan(d) else math.nan
        if d == 0:
            identical += 1
        if not d <= atol:
            different.append({"name": key, "max_abs_diff": d})
    return {
        "equal": not (only_a or only_b or mismatched or different),
        "compared": len(common),
        "identical": identical,
        "max_abs_diff": worst,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "mismatched": mismatched,
        "different": different,
    }
