"""A commit's reply: every delivery taken off it is sent, in order, even when a later one's job failed.

`Pipeline._abort` can only abandon what is still in the reply; a ready delivery popped for a batch and then
dropped when the next job turned out dead would leak its slot, its IV and (for a ring record) the count of
records handed out, and the SDK would then see the ring out of step.
"""

from __future__ import annotations

import asyncio

import pytest
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

from pipellm_daemon.commit_reply import CommitReply
from pipellm_daemon.errors import CommitAborted
from pipellm_daemon.workers import WorkerLost


def _delivery(slot: int) -> pb.Delivery:
    return pb.Delivery(kind=pb.MSG_KIND_DATA, slot=slot, length=16)


@pytest.mark.parametrize("wait", [False, True])
def test_a_failed_job_leaves_it_and_what_follows_in_the_reply_and_sends_what_precedes(wait: bool) -> None:
    async def run() -> tuple[list[pb.Completion], list[pb.Delivery]]:
        loop = asyncio.get_running_loop()
        sent: list[pb.Completion] = []
        out = CommitReply(7, sent.append)
        futs = [loop.create_future() for _ in range(4)]
        for f in futs[:2]:
            f.set_result(None)
        futs[2].set_exception(WorkerLost("worker 0 died (test)"))
        futs[3].set_result(None)
        for slot, f in enumerate(futs):
            out.add(_delivery(slot), f)
        with pytest.raises(CommitAborted):
            await out.flush(wait=wait, final=True)
        return sent, out.drop_unsent()

    sent, unsent = asyncio.run(run())
    assert [d.slot for c in sent for d in c.deliveries] == [0, 1]
    assert not any(c.final for c in sent), "an aborted commit never reports itself complete"
    assert [d.slot for d in unsent] == [2, 3]


def test_flush_without_wait_stops_at_the_first_unfinished_job() -> None:
    async def run() -> tuple[list[pb.Completion], int]:
        loop = asyncio.get_running_loop()
        sent: list[pb.Completion] = []
        out = CommitReply(3, sent.append)
        done, busy = loop.create_future(), loop.create_future()
        done.set_result(None)
        out.add(_delivery(0), done)
        out.add(_delivery(1), busy)
        out.add(_delivery(2))
        await out.flush(wait=False)
        busy.set_result(None)
        left = len(out)
        await out.flush(wait=True, final=True)
        return sent, left

    sent, left = asyncio.run(run())
    assert left == 2
    assert [[d.slot for d in c.deliveries] for c in sent] == [[0], [1, 2]]
    assert [c.final for c in sent] == [False, True]
