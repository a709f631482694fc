"""Errors of `eectl vm` and the provisioner's VM launcher."""

from __future__ import annotations

__all__ = ["VmError", "VmRefused"]


class VmError(Exception):
    """A VM operation failed; the message is one line for an operator."""


class VmRefused(VmError):
    """The request cannot be honoured as asked; nothing was created."""
