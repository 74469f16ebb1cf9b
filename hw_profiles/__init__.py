"""Hardware profiles: one TOML file per device in this folder, loaded into a frozen
HardwareProfile. `load_profile` takes a shipped name or the path of a TOML file."""
from __future__ import annotations

import functools
import math
import numbers
import tomllib
from pathlib import Path

from hw_profiles.schema import FIELDS, KERNELS, PRECISIONS, Budget, HardwareProfile, KernelModel, ProfileError, build_profile

__all__ = ["KERNELS", "Budget", "HardwareProfile", "KernelModel", "ProfileError", "load_profile", "list_profiles", "profile_from_text", "dump_profile"]

PROFILE_DIR = Path(__file__).resolve().parent


def list_profiles() -> list[str]:
    """Names of the shipped profiles (the TOML files next to this module), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_from_text(text: str, source: str = "<profile text>") -> HardwareProfile:
    """Parse and validate TOML text (e.g. a profile stored in a study's spec)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: malformed TOML ({e}); fix the syntax at that line") from None
    return build_profile(data, source)


@functools.lru_cache(maxsize=64)
def _load_file(path: str, mtime: float) -> HardwareProfile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile ({e}); pass a readable TOML file") from None
    return profile_from_text(text, path)


def load_profile(name_or_path: str | Path | HardwareProfile) -> HardwareProfile:
    """A shipped profile by name (see list_profiles) or a TOML file by path."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    text = str(name_or_path)
    if text in list_profiles():
        path = PROFILE_DIR / f"{text}.toml"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(
                f"unknown profile {text!r}: not a shipped name and no such file; "
                f"use one of {list_profiles()} or the path of a TOML profile"
            )
    path = path.resolve()
    return _load_file(str(path), path.stat().st_mtime)


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # numpy scalars too (a fitted profile's numbers), whose repr is not TOML: np.float64(1.5)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        if not math.isfinite(float(v)):
            raise ProfileError(f"a profile value is {float(v)}: TOML profiles hold finite numbers only")
        return repr(float(v))
    return repr(v)


def dump_profile(profile: HardwareProfile, comments: dict[str, str] | None = None, header: str = "") -> str:
    """TOML text that loads back into an equal profile; `comments` maps "section.key" to a
    source note written after the value (every number should say where it comes from)."""
    comments = comments or {}
    p = profile
    k = p.kernels
    values: dict[str, dict[str, object]] = {
        "": {"name": p.name, "kind": p.kind, "description": p.description,
             "latency_model": "kernels" if k is not None else None},
        "compute": {k: p.peak_gops[b] for k, b in PRECISIONS.items() if b in p.peak_gops}
        | {f"efficiency_{k}": v for k, v in p.efficiency.items()},
        "memory": {"bandwidth_gbs": p.bandwidth_gbs, "bandwidth_efficiency": p.bandwidth_efficiency,
                   "capacity_kb": p.capacity_kb, "onchip_kb": p.onchip_kb,
                   "onchip_bandwidth_gbs": p.onchip_bandwidth_gbs},
        "overhead": {"layer_us": p.layer_overhead_us},
        "precision": {"weight_bits": list(p.weight_bits), "act_bits": list(p.act_bits), "float": p.float_policy,
                      "fallback_gops": p.fallback_gops, "fallback_layer_us": p.fallback_layer_us},
        "sparsity": {"unstructured_min_sparsity": p.unstructured_min_sparsity,
                     "unstructured_work_factor": p.unstructured_work_factor,
                     "nm_patterns": [list(x) for x in p.nm_patterns]},
        "kernels": {} if k is None else {"runtime": k.runtime, "samples": k.samples, "inference_us": k.inference_us,
                                         "channel_block": k.channel_block, "channel_align": k.channel_align,
                                         "q8u_block": k.q8u_block, "batch": k.batch}
        | {n: [float(x) for x in k.coef[n]] for n in KERNELS},
        "budget": {"latency_ms": p.budget.latency_ms, "memory_kb": p.budget.memory_kb, "size_kb": p.budget.size_kb},
    }
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section in FIELDS:
        if section and not values[section]:
            continue
        if section:
            lines += ["", f"[{section}]"]
        for key, value in values[section].items():
            if value is None:
                continue
            note = comments.get(f"{section}.{key}" if section else key)
            lines.append(f"{key} = {_toml_value(value)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"
