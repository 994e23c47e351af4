"""ProjectionBatcher: concurrent requests share one pass, each gets what it would get alone, cancels are per job."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from backend.batching import ProjectionBatcher
from gan.pipeline import ModeSettings, Toonifier
from gan.projection import MEMORY_HEADROOM, ProjectionCancelledError, ProjectionMemoryError, projection_bytes_per_face
from tests.conftest import make_tiny_generator


def pixel_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().mean(dim=(1, 2, 3))


def make_toonifier(steps: int = 12) -> Toonifier:
    modes = {"quality": ModeSettings(use_encoder=True, steps=steps)}
    return Toonifier(make_tiny_generator(0), make_tiny_generator(1), loss_fn=pixel_loss, modes=modes)


def crops(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.asyncio
async def test_concurrent_requests_share_a_pass_and_match_their_solo_result():
    tf = make_toonifier()
    a, b = crops(1, 1), crops(2, 2)
    solo = ProjectionBatcher()
    alone_a = await solo.project(tf, a, "quality", seeds=[11])
    alone_b = await solo.project(tf, b, "quality", seeds=[21, 22])
    await solo.close()
    assert solo.passes == [1, 2]

    batcher = ProjectionBatcher(window_s=0.05)
    got_a, got_b = await asyncio.gather(
        batcher.project(tf, a, "quality", seeds=[11]), batcher.project(tf, b, "quality", seeds=[21, 22])
    )
    await batcher.close()
    assert batcher.passes == [3]  # one pass for both jobs
    # float32 convolutions batched 3 vs 1 and 2 round differently (the kernel oneDNN picks depends on the CPU),
    # and the optimisation carries that through every step: equal to 1e-3, not to the last bits
    torch.testing.assert_close(got_a, alone_a, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_b, alone_b, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(got_a, got_b[:1])


@pytest.mark.asyncio
async def test_a_cancelled_job_leaves_the_pass_and_the_others_finish():
    tf = make_toonifier(steps=40)
    batcher = ProjectionBatcher(window_s=0.05)
    cancel = threading.Event()
    steps_seen: list[int] = []

    def progress(step: int, total: int) -> None:
        steps_seen.append(step)
        if step == 5:
            cancel.set()

    doomed = asyncio.ensure_future(
        batcher.project(tf, crops(1, 1), "quality", seeds=[1], progress=progress, cancelled=cancel)
    )
    survivor = asyncio.ensure_future(batcher.project(tf, crops(2, 1), "quality", seeds=[2]))
    with pytest.raises(ProjectionCancelledError, match=r"cancelled at step \d+/40"):
        await doomed
    latents = await survivor
    await batcher.close()
    assert latents.shape == (1, tf.base.num_ws, tf.base.w_dim)
    assert max(steps_seen) < 40  # the cancelled job stopped hearing progress early


@pytest.mark.asyncio
async def test_requests_beyond_max_faces_wait_for_the_next_pass():
    tf = make_toonifier(steps=4)
    batcher = ProjectionBatcher(max_faces=2, window_s=0.05)
    results = await asyncio.gather(*(batcher.project(tf, crops(i, 1), "quality", seeds=[i]) for i in range(5)))
    await batcher.close()
    assert len(results) == 5 and sum(batcher.passes) == 5 and max(batcher.passes) <= 2


def memory_for(tf: Toonifier, faces: float) -> int:
    """Free bytes that hold ``faces`` faces of ``tf``'s projection (by gan.projection's estimate)."""
    per_face = projection_bytes_per_face(tf.base.config, steps=tf.modes["quality"].steps)
    return int(faces * per_face / MEMORY_HEADROOM)


@pytest.mark.asyncio
async def test_passes_are_sized_by_free_memory_and_big_requests_split():
    tf = make_toonifier(steps=4)
    many = crops(7, 5)
    solo = ProjectionBatcher()  # CPU: no memory figure, max_faces only
    assert solo.faces_cap(tf, "quality") == solo.max_faces
    alone = await solo.project(tf, many, "quality", seeds=[1, 2, 3, 4, 5])
    await solo.close()
    assert solo.passes == [5]

    seen: list[tuple[int, int]] = []
    batcher = ProjectionBatcher(window_s=0.05, free_memory=lambda device: memory_for(tf, 2.5))
    assert batcher.faces_cap(tf, "quality") == 2
    got = await batcher.project(tf, many, "quality", seeds=[1, 2, 3, 4, 5], progress=lambda s, t: seen.append((s, t)))
    singles = await asyncio.gather(*(batcher.project(tf, crops(i, 1), "quality", seeds=[i]) for i in range(5)))
    await batcher.close()
    assert batcher.passes[:3] == [2, 2, 1] and max(batcher.passes[3:]) <= 2 and sum(batcher.passes[3:]) == 5
    torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)  # per-face seeds: same latents in any split
    assert len(singles) == 5
    assert [t for _, t in seen] == [12] * 12 and [s for s, _ in seen] == list(range(1, 13))  # 3 passes x 4


@pytest.mark.asyncio
async def test_no_face_fits_refuses_clearly():
    tf = make_toonifier(steps=4)
    batcher = ProjectionBatcher(window_s=0.01, free_memory=lambda device: memory_for(tf, 0.5))
    with pytest.raises(ProjectionMemoryError, match="needs about"):
        await batcher.project(tf, crops(1, 1), "quality", seeds=[1])
    await batcher.close()
