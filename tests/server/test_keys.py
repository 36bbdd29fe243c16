"""Several API keys on one server (issue 31, item 7): each sees only its own jobs and images, attachment and
idempotency are per key, and each holds at most its share of the queue; an admin key sees everything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sdxl_refinery.config import Settings
from sdxl_refinery.errors import RefineryError
from sdxl_refinery.server.app import create_app
from sdxl_refinery.server.keys import BadKeysFile, parse_keys

from ..fakes import FakeEngine, fake_service
from ..waiting import patience, poll
from .conftest import RunningServer, ServerFactory

ALICE, BOB, OPS = "alice-secret-0123456789", "bob-secret-0123456789ab", "ops-secret-0123456789abc"
SMALL = {"prompt": "a kite", "width": 64, "height": 64, "num_inference_steps": 2, "refiner_steps": 1}
KEYS = f"""
[keys.alice]
key = "{ALICE}"
[keys.bob]
key = "{BOB}"
[keys.ops]
key = "{OPS}"
admin = true
"""


def _as(server: RunningServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _finished(server: RunningServer, job_id: str) -> dict[str, Any]:
    """The job once it succeeded, as the admin key reads it."""
    ops = _as(server, OPS)

    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = ops.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] == "succeeded" else None

    return poll(done, f"job {job_id} to succeed")


@pytest.fixture
def keyed(server_factory: ServerFactory, tmp_path: Path) -> Iterator[RunningServer]:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    with server_factory(api_keys_file=keys, max_queue=6) as server:
        yield server


def test_each_key_sees_only_its_own_jobs_and_images(keyed: RunningServer) -> None:
    alice, bob, ops = _as(keyed, ALICE), _as(keyed, BOB), _as(keyed, OPS)
    mine = [alice.post("/v1/jobs", json={**SMALL, "prompt": f"alice's {i}"}).json()["id"] for i in range(2)]
    theirs = bob.post("/v1/jobs", json={**SMALL, "prompt": "bob's secret"}).json()["id"]
    for job_id in [*mine, theirs]:
        _finished(keyed, job_id)
    listed = alice.get("/v1/jobs").json()
    assert listed["total"] == 2 and {item["id"] for item in listed["items"]} == set(mine)
    assert "bob's secret" not in alice.get("/v1/jobs").text
    assert bob.get("/v1/jobs").json()["total"] == 1
    assert ops.get("/v1/jobs").json()["total"] == 3  # the admin key sees everyone's
    image = ops.get(f"/v1/jobs/{theirs}").json()["result"]["urls"][0].removeprefix(keyed.url)
    for route in (f"/v1/jobs/{theirs}", f"/v1/jobs/{theirs}/events", image):  # another key's: as if none existed
        assert alice.get(route).status_code == 404, route
    assert alice.post(f"/v1/jobs/{theirs}/cancel").status_code == 404
    assert bob.get(image).status_code == 200 and ops.get(image).status_code == 200
    assert ops.get(f"/v1/jobs/{theirs}").json()["owner"] == "bob"
    assert httpx.get(f"{keyed.url}/v1/jobs").status_code == 401  # no key at all


def test_idempotency_keys_and_retries_are_per_key(keyed: RunningServer) -> None:
    alice, bob = _as(keyed, ALICE), _as(keyed, BOB)
    same = {"Idempotency-Key": "order-1"}
    first = alice.post("/v1/jobs", json=SMALL, headers=same)
    other = bob.post("/v1/jobs", json={**SMALL, "prompt": "a boat"}, headers=same)
    assert (first.status_code, other.status_code) == (202, 202)  # bob's "order-1" is not alice's
    assert first.json()["id"] != other.json()["id"]
    again = alice.post("/v1/jobs", json=SMALL, headers=same)
    assert again.json()["id"] == first.json()["id"]  # alice's own retry attaches to her job


def test_one_key_filling_its_share_leaves_room_for_the_others(keyed: RunningServer, fake_engine: FakeEngine) -> None:
    # max_queue 6 among 3 keys: each key holds at most 2 jobs queued or running.
    fake_engine.pause_at(0)
    alice, bob = _as(keyed, ALICE), _as(keyed, BOB)
    assert [alice.post("/v1/jobs", json=SMALL).status_code for _ in range(2)] == [202, 202]
    assert fake_engine.paused.wait(patience(60))
    third = alice.post("/v1/jobs", json=SMALL)
    assert third.status_code == 429 and "key 'alice' has its share of the queue (2 jobs" in third.text
    assert third.headers["Retry-After"] == "30"
    assert [bob.post("/v1/jobs", json=SMALL).status_code for _ in range(2)] == [202, 202]  # bob is not starved
    fake_engine.resume()
    for item in _as(keyed, OPS).get("/v1/jobs").json()["items"]:
        _finished(keyed, item["id"])
    assert alice.post("/v1/jobs", json=SMALL).status_code == 202  # her jobs done: her share is free again


def test_a1111_progress_and_interrupt_only_reach_the_callers_own_job(
    keyed: RunningServer, fake_engine: FakeEngine
) -> None:
    fake_engine.pause_at(1)
    alice, bob = _as(keyed, ALICE), _as(keyed, BOB)
    job_id = alice.post("/v1/jobs", json={**SMALL, "num_inference_steps": 6}).json()["id"]
    assert fake_engine.paused.wait(patience(60))
    assert bob.get("/sdapi/v1/progress").json()["state"]["job"] == ""  # alice's job is not bob's to watch
    assert bob.post("/sdapi/v1/interrupt").json() == {"interrupted": None}
    assert alice.get("/sdapi/v1/progress").json()["state"]["job"] == job_id
    fake_engine.resume()
    job = _finished(keyed, job_id)
    assert job["result"]["metadata"].get("interrupted", False) is False  # bob's interrupt did not touch it


def test_openai_clients_use_their_own_key(keyed: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=BOB, max_retries=0)
    answer = client.images.generate(prompt="a red barn", size="256x256")
    assert len(answer.data) == 1
    assert _as(keyed, BOB).get("/v1/jobs").json()["total"] == 1
    assert _as(keyed, ALICE).get("/v1/jobs").json()["total"] == 0


def test_the_keys_file_is_read_again_when_it_changes(keyed: RunningServer, tmp_path: Path) -> None:
    carol = "carol-secret-0123456789"
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS + f'[keys.carol]\nkey = "{carol}"\n')
    poll(lambda: _as(keyed, carol).get("/v1/jobs").status_code == 200, "the new key to be read")
    keys.write_text("[keys.broken\n")  # a typo: the keys loaded before stay, nobody is locked out or let in
    assert _as(keyed, carol).get("/v1/jobs").status_code == 200
    assert httpx.get(f"{keyed.url}/v1/jobs").status_code == 401
    keys.unlink()
    assert _as(keyed, ALICE).get("/v1/jobs").status_code == 200


@pytest.mark.parametrize(
    ("text", "said"),
    [("", "no keys"), ('[keys.a]\nkey = "short"', "at least 16 characters"),
     (f'[keys.a]\nkey = "{ALICE}"\n[keys.b]\nkey = "{ALICE}"', "the same key as keys.a"),
     (f'[keys."a b"]\nkey = "{ALICE}"', "must be 1-64 letters"),
     (f'[keys.a]\nkey = "{ALICE}"\nqueue_share = 0', "queue_share: must be a whole number"),
     (f'[keys.a]\nkey = "{ALICE}"\nadmin = "yes"', "admin: must be true or false"),
     ("keys = [", "not TOML")],
)  # fmt: skip
def test_a_bad_keys_file_is_refused_naming_the_rule(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(BadKeysFile, match=said):
        parse_keys(text, max_queue=100)
    keys = tmp_path / "keys.toml"
    keys.write_text(text)
    service, _engine = fake_service()
    try:
        with pytest.raises(RefineryError, match=f"refusing to start: API keys file .*{said}"):
            create_app(Settings(data_dir=tmp_path / "data", base_model="tiny", refiner_model="tiny",
                                api_keys_file=keys), service=service)  # fmt: skip
    finally:
        service.close()


def test_shares_default_to_the_queue_divided_among_the_keys() -> None:
    keys = parse_keys(KEYS + f'[keys.big]\nkey = "{"b" * 20}"\nqueue_share = 50\n', max_queue=100)
    assert {caller.name: caller.share for caller in keys.values()} == {"alice": 25, "bob": 25, "ops": 25, "big": 50}
    assert [caller.name for caller in keys.values() if caller.admin] == ["ops"]
