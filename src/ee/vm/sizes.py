"""Node-size presets for VMs, and how environment and flags override them (pure).

A preset is a row of :data:`PRESETS`. Each field may be overridden per size by the
environment (``EE_VM_<SIZE>_MEMORY_GIB``, ``EE_VM_<SIZE>_VCPUS``, ``EE_VM_<SIZE>_DISK_GIB``;
``<SIZE>`` upper-case) and then by a flag; the flag wins. A data disk of 0 GiB means
none (the guest's /data is then tmpfs).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["PRESETS", "SizeError", "VmSize", "resolve_size"]


class SizeError(ValueError):
    """An unknown size or an override that is not a positive number."""


@attrs.frozen
class VmSize:
    name: str
    memory_gib: float
    vcpus: int
    disk_gib: int  # the /data disk; 0: none

    @property
    def memory_mib(self) -> int:
        return int(self.memory_gib * 1024)


PRESETS: Mapping[str, VmSize] = {
    "tiny": VmSize("tiny", 4, 4, 0),
    "standard": VmSize("standard", 16, 16, 0),
    "llm": VmSize("llm", 16, 8, 80),
}


def _number(text: str, what: str, *, integer: bool, minimum: float) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise SizeError(f"{what} must be a {'whole ' if integer else ''}number, "
                        f"got {text!r}") from None
    if value < minimum or value != value or value in (float("inf"), float("-inf")):
        raise SizeError(f"{what} must be >= {minimum:g}, got {text!r}")
    return value


def resolve_size(name: str, env: Mapping[str, str], *, memory_gib: str | None = None,
                 vcpus: str | None = None, disk_gib: str | None = None) -> VmSize:
    """The preset *name* with env overrides, then flag overrides (as given, text)."""
    base = PRESETS.get(name)
    if base is None:
        raise SizeError(f"unknown size {name!r} (one of: {', '.join(PRESETS)})")
    prefix = f"EE_VM_{name.upper()}_"
    fields: dict[str, float] = {"memory_gib": base.memory_gib, "vcpus": base.vcpus,
                                "disk_gib": base.disk_gib}
    for field, flag, integer, minimum in (("memory_gib", memory_gib, False, 0.25),
                                          ("vcpus", vcpus, True, 1),
                                          ("disk_gib", disk_gib, True, 0)):
        env_name = prefix + field.upper()
        if env.get(env_name):
            fields[field] = _number(env[env_name], env_name, integer=integer, minimum=minimum)
        if flag is not None:
            fields[field] = _number(flag, "--" + field.split("_")[0], integer=integer,
                                    minimum=minimum)
    return VmSize(name, fields["memory_gib"], int(fields["vcpus"]), int(fields["disk_gib"]))
