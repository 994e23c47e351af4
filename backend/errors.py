"""Errors the service raises: every message is written for the person who sent the command, as it is."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: ``str(error)`` is safe and useful to show to the user."""

    code = "error"

    @property
    def public_message(self) -> str:
        """What a chat front end shows the user (the message itself, unless a subclass says otherwise)."""
        return str(self)


class BadInputError(ServiceError):
    """The photo, dataset or parameters cannot be used (not retried)."""

    code = "bad_input"


class NotAllowedError(ServiceError):
    """The actor lacks the role this command needs."""

    code = "not_allowed"


class NotFoundError(ServiceError):
    """No such job, style, poll or option (or not visible to this actor)."""

    code = "not_found"


class ConflictError(ServiceError):
    """The request clashes with the current state (a closed poll, a style already published…)."""

    code = "conflict"


class JobCancelledError(Exception):
    """Raised inside a job function when its cancel flag was seen between two steps."""


class UnavailableError(ServiceError, ConnectionError):
    """A part the service needs (the database, Redis) is unreachable, refused the connection or did not answer in
    time. ``str()`` names the part and where it is (never a password), for logs and the CLI; front ends show
    ``public_message`` instead, which names no host. Also a ConnectionError, so code that retries on connection
    errors retries on this one too."""

    code = "unavailable"

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(detail)
        self.part = part  # "database" or "redis"

    def __reduce__(self) -> tuple:  # picklable across processes despite the two-argument constructor
        return (type(self), (self.part, str(self)))

    @property
    def public_message(self) -> str:
        return f"Toonify can't reach its {self.part} right now; please try again in a few minutes."
