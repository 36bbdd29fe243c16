"""Jobs belong to the key that submitted them (issue 31, item 7), in both stores: listings by owner, and each
owner's share of the queue counted from its own queued and running jobs."""

from __future__ import annotations

import pytest

from sdxl_refinery.jobs.models import JobStatus
from sdxl_refinery.jobs.store import JobStore, Owner, QueueFull
from sdxl_refinery.request import GenerationRequest


@pytest.fixture
def store(each_store: JobStore) -> JobStore:
    return each_store


def test_each_owner_lists_its_own_and_holds_its_share(store: JobStore) -> None:
    request = GenerationRequest(prompt="x", width=256, height=256)
    alice, bob = Owner("alice", share=2), Owner("bob", share=2)
    first = store.create(request, "native", 10, alice)
    store.create(request, "native", 10, alice)
    with pytest.raises(QueueFull, match="key 'alice' has its share of the queue"):
        store.create(request, "native", 10, alice)
    bobs = store.create(request, "native", 10, bob)
    assert store.get(first.id).owner == "alice"
    jobs, total = store.list(0, 10, owner="alice")
    assert total == 2 and {job.owner for job in jobs} == {"alice"}
    assert store.list(0, 10, owner="bob")[0][0].id == bobs.id
    assert store.list(0, 10)[1] == 3  # no owner: every job
    assert store.start(first.id, "w") is not None  # running still counts against the share
    with pytest.raises(QueueFull):
        store.create(request, "native", 10, alice)
    store.succeed(first.id, {"images": [], "seeds": [], "metadata": {}})
    store.create(request, "native", 10, alice)  # a finished job frees its place
    assert store.list(0, 10, JobStatus.SUCCEEDED, owner="alice")[1] == 1
    assert store.list(0, 10, JobStatus.SUCCEEDED, owner="bob")[1] == 0
