"""Snapshots of the live supervision tree, for the admin API and the console."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class TreeNode:
    name: str
    kind: str  # "supervisor" | "actor" | "worker"
    state: str  # "starting" | "running" | "restarting" | "stopping" | "stopped"
    restarts: int = 0
    last_error: str | None = None
    mailbox_depth: int | None = None
    strategy: str | None = None
    children: tuple[TreeNode, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "mailbox_depth": self.mailbox_depth,
            "strategy": self.strategy,
            "children": [c.to_dict() for c in self.children],
        }

    def walk(self) -> list[TreeNode]:
        """This node and every descendant, depth first."""
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out
