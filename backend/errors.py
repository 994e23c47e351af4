"""Errors the service raises: every message is written for the person who sent the command, as it is."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: ``str(error)`` is safe and useful to show to the user."""

    code = "error"


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
