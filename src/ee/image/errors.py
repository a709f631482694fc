"""Typed failures of image builds and VM boots (whose fault it is, in the name)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BuildFailed", "ImageError", "ProfileError", "ToolMissing"]


class ImageError(Exception):
    """Base of every image error; ``str()`` is one printable line."""


class ProfileError(ImageError):
    """The profile file is missing or malformed (the definition's fault)."""


class ToolMissing(ImageError):
    """A host tool the build or boot needs is not installed (the host's fault)."""

    def __init__(self, tools: Sequence[str], packages: Sequence[str]) -> None:
        self.tools = tuple(tools)
        self.packages = tuple(packages)
        super().__init__(
            f"missing host tools: {', '.join(self.tools)} "
            f"(apt-get install {' '.join(sorted(set(self.packages)))})"
        )


class BuildFailed(ImageError):
    """A build step failed; names the step and the tail of what the tool said."""

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        self.detail = detail
        super().__init__(f"{step}: {detail}")
