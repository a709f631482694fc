"""The generic actor mechanism: actors, mailboxes, refs and the name registry.

No domain words live here; ``ee.supervisors`` builds supervision on top, and
``ee.actors`` the domain actors.
"""

from ee.runtime.actor import Actor, ActorHost, handler
from ee.runtime.errors import (
    ActorCrashed,
    ActorDead,
    ActorError,
    AskTimeout,
    ChaosCrash,
    MailboxFull,
    NameTaken,
    UnhandledMessage,
)
from ee.runtime.registry import ActorRef, Registry

__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorDead",
    "ActorError",
    "ActorHost",
    "ActorRef",
    "AskTimeout",
    "ChaosCrash",
    "MailboxFull",
    "NameTaken",
    "Registry",
    "UnhandledMessage",
    "handler",
]
