"""Errors of the actor runtime, named by whose fault they are.

* ``ActorDead``    the addressee is gone (stopped for good, or never existed).
* ``MailboxFull``  the addressee is alive but its bounded mailbox has no room (``try_tell``).
* ``AskTimeout``   the addressee did not answer within the caller's timeout.
* ``ActorCrashed`` the addressee's handler raised while answering; ``cause`` is why.
* ``NameTaken``    a live actor already holds that name.
* ``UnhandledMessage`` the caller sent a message type the actor has no handler for.
"""

from __future__ import annotations


class ActorError(Exception):
    """Base of every error the runtime raises to a caller."""


class ActorDead(ActorError):
    def __init__(self, name: str, detail: str = "not running") -> None:
        super().__init__(f"actor {name!r} is dead: {detail}")
        self.name = name


class MailboxFull(ActorError):
    def __init__(self, name: str, capacity: int) -> None:
        super().__init__(f"mailbox of actor {name!r} is full ({capacity} messages)")
        self.name = name
        self.capacity = capacity


class AskTimeout(ActorError):
    def __init__(self, name: str, message: object, timeout: float) -> None:
        super().__init__(
            f"actor {name!r} did not answer {type(message).__name__} within {timeout:g}s"
        )
        self.name = name
        self.timeout = timeout


class ActorCrashed(ActorError):
    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"actor {name!r} crashed: {cause!r}")
        self.name = name
        self.cause = cause


class NameTaken(ActorError):
    def __init__(self, name: str) -> None:
        super().__init__(f"actor name {name!r} is already taken")
        self.name = name


class UnhandledMessage(ActorError):
    def __init__(self, name: str, message: object) -> None:
        super().__init__(f"actor {name!r} has no handler for {type(message).__name__}")
        self.name = name


class ChaosCrash(Exception):
    """Injected on purpose by a chaos hook (tests, operator drills)."""
