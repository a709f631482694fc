"""Node size presets and datacenter labels: the registration vocabulary.

A node size is a named preset (vCPU, memory, GPU). A datacenter label is
``<cloud>:<zone>`` in lower case (``gcp:us-central1``, ``baremetal:chicago-h100``);
cloud aliases (``google`` → ``gcp``, ``bm`` → ``baremetal``, …) are normalised so one
place has one name. Both are refused with a reason code when they do not parse or are
unknown — registration never invents a size or a datacenter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

_LABEL = re.compile(r"\A([a-z][a-z0-9-]{0,31}):([a-z0-9][a-z0-9.-]{0,62})\Z")
_SIZE_NAME = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")

DEFAULT_CLOUD_ALIASES: Final[Mapping[str, str]] = {
    "google": "gcp",
    "gce": "gcp",
    "amazon": "aws",
    "ec2": "aws",
    "bm": "baremetal",
    "metal": "baremetal",
    "bare-metal": "baremetal",
}


class LabelError(ValueError):
    """A datacenter label that does not parse (reason code ``BAD_DATACENTER``)."""


@attrs.frozen
class NodeSize:
    name: str = attrs.field(validator=attrs.validators.matches_re(_SIZE_NAME))
    vcpus: int = attrs.field(validator=attrs.validators.gt(0))
    memory_mb: int = attrs.field(validator=attrs.validators.gt(0))
    gpu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vcpus": self.vcpus, "memory_mb": self.memory_mb,
                "gpu": self.gpu}


DEFAULT_NODE_SIZES: Final[tuple[NodeSize, ...]] = (
    NodeSize("tiny", vcpus=1, memory_mb=2048),
    NodeSize("standard", vcpus=4, memory_mb=16384),
    NodeSize("llm", vcpus=16, memory_mb=131072, gpu=True),
)


@attrs.frozen
class Vocabulary:
    """The node sizes and cloud aliases a CP accepts (configurable)."""

    sizes: Mapping[str, NodeSize] = attrs.field(
        factory=lambda: {s.name: s for s in DEFAULT_NODE_SIZES})
    cloud_aliases: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_CLOUD_ALIASES))

    @classmethod
    def from_config(cls, doc: Mapping[str, Any] | None) -> Vocabulary:
        """``{"node_sizes": [{"name","vcpus","memory_mb","gpu"?}], "cloud_aliases": {..}}``."""
        if not doc:
            return cls()
        sizes = doc.get("node_sizes")
        aliases = doc.get("cloud_aliases")
        base = cls()
        parsed_sizes = base.sizes
        if sizes is not None:
            if not isinstance(sizes, list) or not sizes:
                raise ValueError("node_sizes: expected a non-empty list")
            parsed = {}
            for i, item in enumerate(sizes):
                if not isinstance(item, dict):
                    raise ValueError(f"node_sizes[{i}]: expected an object")
                try:
                    size = NodeSize(name=item["name"], vcpus=int(item["vcpus"]),
                                    memory_mb=int(item["memory_mb"]),
                                    gpu=bool(item.get("gpu", False)))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"node_sizes[{i}]: {exc}") from None
                parsed[size.name] = size
            parsed_sizes = parsed
        parsed_aliases = base.cloud_aliases
        if aliases is not None:
            if not isinstance(aliases, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
                raise ValueError("cloud_aliases: expected an object of strings")
            parsed_aliases = {k.lower(): v.lower() for k, v in aliases.items()}
        return cls(sizes=parsed_sizes, cloud_aliases=parsed_aliases)

    def size(self, name: str) -> NodeSize | None:
        return self.sizes.get(name)

    def normalise_label(self, label: str) -> str:
        """The canonical form of a datacenter label; ``LabelError`` when it does not parse."""
        text = label.strip().lower()
        cloud, sep, zone = text.partition(":")
        if not sep:
            raise LabelError(f"datacenter label {label!r} is not '<cloud>:<zone>'")
        canonical = f"{self.cloud_aliases.get(cloud, cloud)}:{zone}"
        if not _LABEL.match(canonical):
            raise LabelError(
                f"datacenter label {label!r}: cloud must match [a-z][a-z0-9-]* and zone "
                "[a-z0-9][a-z0-9.-]*")
        return canonical
