"""What the service's callers pass in and get back, and the parsing of a ``/blend`` argument."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backend.errors import BadInputError, ServiceError
from gan.blending import BlendError, BlendSpec


class QuotaError(ServiceError):
    code = "quota"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Actor:
    """The person giving a command: platform ids, plus whether the platform says they administer the place."""

    platform: str
    user_id: str
    name: str = ""
    is_admin: bool = False


@dataclass(frozen=True)
class Place:
    """A Discord guild or a Telegram chat (None for a private conversation)."""

    platform: str
    community_id: str
    name: str = ""


@dataclass(frozen=True)
class JobTicket:
    job_id: str
    status: str
    duplicate: bool = False  # True: an identical request already existed; this is that job


@dataclass(frozen=True)
class ToonOutput:
    job_id: str
    composite: bytes  # the photo with every toonified face pasted back (PNG)
    crops: list[bytes]  # aligned toon crops (PNG), largest face first
    style: str
    spec: dict[str, Any]
    faces: int
    too_small: int
    mode: str = ""  # how it was made: instant (the style's student network), fast, balanced or quality
    edits: tuple[tuple[str, float], ...] = ()  # an /edit: (named direction, strength) applied


@dataclass(frozen=True)
class StyleInfo:
    name: str
    status: str
    community: bool  # True: this community's own style; False: available everywhere
    default_blend: dict[str, Any]
    distill_job_id: str | None = None  # publish_style: the job training its instant model, when one was queued


@dataclass(frozen=True)
class PollOptionInfo:
    position: int
    label: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class PollInfo:
    poll_id: int
    style: str
    status: str
    closes_at: datetime
    options: list[PollOptionInfo]
    tally: dict[int, int] = field(default_factory=dict)  # position -> votes
    winner: int | None = None
    preview_job_id: str | None = None  # renders the grid of options on probe faces (watch it, then result())
    distill_job_id: str | None = None  # close_poll: the job training the new default blend's instant model
    snapshots: bool = False  # a vote between a fine-tune's snapshots (at one blend) rather than between blends


@dataclass(frozen=True)
class ForgetReport:
    jobs: int
    blobs: int
    files: int
    votes: int
    latents: int


BLEND_LEVELS = (4, 8, 16, 32, 64, 128, 256, 512)
MAX_DATASET_BYTES = 1 << 30  # a fine-tune dataset zip (a few hundred photos fit in far less)


def parse_blend(value: int | str | BlendSpec | None, resolution: int | None = None) -> BlendSpec | None:
    """``/blend 32`` → a swap at 32 px; also accepts a BlendSpec or its JSON. None stays None."""
    if value is None or isinstance(value, BlendSpec):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return BlendSpec.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError, BlendError) as e:
            raise BadInputError(f"that blend description is not valid: {e}") from e
    try:
        level = int(value)
    except (TypeError, ValueError):
        raise BadInputError(f"blend must be a resolution such as 16 or 32, not {value!r}") from None
    allowed = [lv for lv in BLEND_LEVELS if resolution is None or lv <= resolution]
    if level not in allowed:
        raise BadInputError(f"blend must be one of {', '.join(map(str, allowed))}, not {level}")
    return BlendSpec(mode="swap", resolution=level, structure_from="toon")
