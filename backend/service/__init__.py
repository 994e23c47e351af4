"""The service API: the only thing the bots call. Typed inputs and results; errors are ServiceErrors whose
``public_message`` can be shown to the user as it is.

A front end passes who is asking (:class:`Actor`, with the platform's word on whether they administer the
community) and where (:class:`Place`); the service keeps users, communities and memberships in step with
that on every call, checks roles, quotas and input, writes the job row, and enqueues. Job ids are stable and
idempotent: the same photo with the same options from the same person is one job.

:class:`ToonService` is one façade over five parts, each usable alone on a Runtime: styles
(:mod:`backend.service.styles`), jobs (:mod:`~backend.service.jobs`), polls (:mod:`~backend.service.polls`),
privacy (:mod:`~backend.service.privacy`) and the latent space (:mod:`~backend.service.explore`: /edit,
/sweep). A database or Redis that cannot be reached raises :class:`~backend.errors.UnavailableError` naming it.
"""

from __future__ import annotations

from backend.config import Settings
from backend.errors import UnavailableError
from backend.runtime import Runtime, open_runtime
from backend.service.explore import DirectionsInfo, ExploreCommands, SweepOutput
from backend.service.jobs import JobCommands
from backend.service.polls import PollCommands
from backend.service.privacy import PrivacyCommands
from backend.service.styles import StyleCommands
from backend.service.types import (
    BLEND_LEVELS,
    MAX_DATASET_BYTES,
    Actor,
    ForgetReport,
    JobTicket,
    Place,
    PollInfo,
    PollOptionInfo,
    QuotaError,
    StyleInfo,
    ToonOutput,
    parse_blend,
)

__all__ = [
    "BLEND_LEVELS",
    "MAX_DATASET_BYTES",
    "Actor",
    "DirectionsInfo",
    "ForgetReport",
    "JobTicket",
    "Place",
    "PollInfo",
    "PollOptionInfo",
    "QuotaError",
    "StyleInfo",
    "SweepOutput",
    "ToonOutput",
    "ToonService",
    "UnavailableError",
    "parse_blend",
]


class ToonService(StyleCommands, JobCommands, PollCommands, PrivacyCommands, ExploreCommands):
    """Open with ``await ToonService.open(settings)`` (or over an existing Runtime); ``await close()``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @classmethod
    async def open(cls, settings: Settings | None = None, **kw) -> ToonService:
        rt = await open_runtime(settings or Settings.from_env(), **kw)
        service = cls(rt)
        try:
            await service.sync_bundled_styles()
        except BaseException:
            await rt.close()
            raise
        return service

    async def close(self) -> None:
        await self.rt.close()
