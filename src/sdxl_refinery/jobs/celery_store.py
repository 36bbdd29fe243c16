"""Job records in Redis, shared by every API server and worker of a Celery deployment.

One JSON record per job, sorted sets per status for listing, queue positions
and counts, and status changes made atomic by a Lua script (a job finished by
one process is never moved back by another). Creating a job stores the record
first and then sends the Celery task named after the job id.

Redis faults never reach callers raw: a lost or hung connection (every command has a
timeout, and refused connections are retried three times with backoff), a Redis out of memory or
unable to persist, a read-only replica, all become `StoreUnavailable`, which the API
answers with 503 (507 when Redis has no room) and the worker retries until it passes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..batching import batch_key
from ..config import Settings
from ..errors import StoreUnavailable
from .celery_app import PREFIX, TASK_NAME, make_celery
from .celery_events import forward_events
from .events import JobEvents
from .models import Job, JobProgress, JobRequest, JobStatus, request_from_record
from .store import Dedup, JobLost, JobNotFound, JobStore, Owner, QueueFull

_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local job = cjson.decode(raw)
if ARGV[6] ~= '' then
  for key, value in pairs(cjson.decode(ARGV[6])) do
    if job[key] ~= value then return 'FENCED' end
  end
end
local allowed = false
for status in string.gmatch(ARGV[1], '[^,]+') do
  if job.status == status then allowed = true end
end
if not allowed then return false end
local patch = cjson.decode(ARGV[3])
for key, value in pairs(patch) do job[key] = value end
if ARGV[5] == '1' then job.attempts = job.attempts + 1 end
redis.call('ZREM', ARGV[4] .. job.status, job.id)
job.status = ARGV[2]
redis.call('ZADD', ARGV[4] .. job.status, job.seq, job.id)
local encoded = cjson.encode(job)
redis.call('SET', KEYS[1], encoded)
return encoded
"""
_ALL = ",".join(status.value for status in JobStatus)
log = logging.getLogger(__name__)
COMMAND_TIMEOUT_SECONDS = 3.0  # a hung Redis (or a half-open connection) fails a call instead of holding it

Method = TypeVar("Method", bound=Callable[..., Any])


def redis_client(url: str) -> redis.Redis:
    """A client whose every command times out, and whose connection blips are retried with backoff."""
    return redis.Redis.from_url(
        url,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        socket_connect_timeout=COMMAND_TIMEOUT_SECONDS,
        health_check_interval=30,
        # A refused or reset connection is tried again (a restart, a failover); a timeout is not, since
        # each try would wait the whole timeout again.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3, supported_errors=(redis.ConnectionError,)),
    )


def unavailable(error: Exception) -> StoreUnavailable:
    """A Redis or broker error as `StoreUnavailable`, full (507) when Redis has no room to write."""
    # Over its maxmemory (redis-py's OutOfMemoryError), or refusing writes because it cannot save to disk.
    no_room = isinstance(error, redis.exceptions.OutOfMemoryError) or str(error).startswith("MISCONF")
    return StoreUnavailable(f"Redis: {error}", disk_full=no_room)


def guarded(method: Method) -> Method:
    """Redis and broker errors of `method` raised as `StoreUnavailable` (JobNotFound and QueueFull pass)."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, OperationalError) as error:
            raise unavailable(error) from error

    return call  # type: ignore[return-value]


class CeleryJobStore(JobStore):
    """Job records in Redis; `create` also enqueues the Celery task.

    Args:
        settings: `redis_url` for records and broker.
        client: a Redis client (tests pass their own).
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis: redis.Redis = client or redis_client(settings.redis_url)
        self._transition = self.redis.register_script(_TRANSITION)
        self._celery: Any = None
        self._attempts: dict[str, dict[str, Any]] = {}  # jobs this process started: their attempt and worker

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def _job(raw: bytes | str) -> Job:
        record = json.loads(raw)
        return Job(
            id=record["id"],
            request=request_from_record(json.loads(record["request"])),
            status=JobStatus(record["status"]),
            created=record["created"],
            started=record.get("started"),
            finished=record.get("finished"),
            progress=JobProgress(**json.loads(record["progress"])) if record.get("progress") else JobProgress(),
            result=json.loads(record["result"]) if record.get("result") else None,
            error=record.get("error"),
            attempts=record.get("attempts", 0),
            cancel_requested=bool(record.get("cancel_requested")),
            interrupt_requested=bool(record.get("interrupt_requested")),
            worker=record.get("worker"),
            client=record.get("client"),
            owner=record.get("owner"),
            fingerprint=record.get("fingerprint"),
            answered=bool(record.get("answered")),
            batch=record.get("batch") or None,
        )

    def _move(
        self, job_id: str, allowed: str, status: JobStatus, patch: dict[str, Any], count: bool = False,
        expect: dict[str, Any] | None = None,
    ) -> Job | None:  # fmt: skip
        """Move the job to `status` with `patch`, atomically, if its status is one of `allowed` (else None) and
        its record holds `expect`'s values.

        Raises:
            JobLost: the record does not hold `expect`'s values (another attempt holds the job now).
        """
        arguments = [allowed, status.value, json.dumps(patch), f"{PREFIX}status:", "1" if count else "0",
                     json.dumps(expect) if expect else ""]  # fmt: skip
        raw = self._transition(keys=[self._key(job_id)], args=arguments)
        if raw in (b"FENCED", "FENCED"):  # the fence stays: every later write of this attempt is refused too
            raise JobLost(f"job {job_id}: this attempt no longer holds it (its worker was taken for dead)")
        return self._job(raw) if raw else None

    def _started(self, job: Job | None) -> Job | None:
        """Remember the attempt this process started, so that its writes are fenced to it."""
        if job is not None and job.worker is not None:
            self._attempts[job.id] = {"attempts": job.attempts, "worker": job.worker}
        return job

    def _fence(self, job_id: str) -> dict[str, Any] | None:
        """What the record must hold for a write of this process's attempt (None: not a job it started)."""
        return self._attempts.get(job_id)

    def _finish(self, job_id: str, allowed: str, status: JobStatus, patch: dict[str, Any]) -> None:
        """A last write of this process's attempt (fenced as every write); the attempt is forgotten after it."""
        self._move(job_id, allowed, status, patch, expect=self._fence(job_id))
        self._attempts.pop(job_id, None)

    def _send(self, job_id: str) -> None:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        self._celery.send_task(TASK_NAME, args=[job_id], task_id=job_id, retry=False)

    # -- JobStore ------------------------------------------------------------------------------

    @guarded
    def create(self, request: JobRequest, client: str, max_depth: int | None = None, owner: Owner | None = None) -> Job:
        job = Job(id=Job.new_id(), request=request, client=client, owner=owner.name if owner else None)
        return self._create(job, max_depth, owner)

    @guarded
    def create_or_attach(
        self, request: JobRequest, client: str, max_depth: int | None, dedup: Dedup, owner: Owner | None = None
    ) -> tuple[Job, bool]:
        """Claim the fingerprint with SET NX before creating, so that concurrent API servers agree on one job."""
        key = f"{PREFIX}fingerprint:{dedup.fingerprint}"
        job = Job(id=Job.new_id(), request=request, client=client, fingerprint=dedup.fingerprint,
                  owner=owner.name if owner else None)  # fmt: skip
        ttl = max(int(dedup.window_seconds), 1)
        if not self.redis.set(key, job.id, nx=True, ex=ttl):
            earlier = self._claimed_job(key)
            if earlier is not None and dedup.accepts(earlier, job.created):
                return earlier, True
            self.redis.set(key, job.id, ex=ttl)  # the earlier job does not count: this one takes its place
        try:
            return self._create(job, max_depth, owner), False
        except QueueFull:
            self.redis.delete(key)  # nothing was queued under this fingerprint
            raise

    def _claimed_job(self, key: str) -> Job | None:
        """The job a fingerprint key names; its record may still be on its way from another API server."""
        for _ in range(20):
            job_id = self.redis.get(key)
            if job_id is None:
                return None
            try:
                return self.get(job_id.decode() if isinstance(job_id, bytes) else str(job_id))
            except JobNotFound:
                time.sleep(0.01)
        return None

    @guarded
    def mark_answered(self, job_id: str) -> None:
        self._move(job_id, JobStatus.SUCCEEDED.value, JobStatus.SUCCEEDED, {"answered": True})

    def _create(self, job: Job, max_depth: int | None, owner: Owner | None = None) -> Job:
        if max_depth is not None and (depth := self.depth()) >= max_depth:
            raise QueueFull(depth, retry_after=30)
        if owner is not None and owner.share is not None and (held := self._held(owner.name)) >= owner.share:
            raise QueueFull(held, retry_after=30, owner=owner.name)
        seq = int(self.redis.incr(f"{PREFIX}seq"))
        record = {"id": job.id, "seq": seq, "status": job.status.value, "request": job.request.model_dump_json(),
                  "client": job.client, "created": job.created, "attempts": 0, "cancel_requested": False,
                  "fingerprint": job.fingerprint, "answered": False, "owner": job.owner,
                  "batch_key": batch_key(job.request), "n": job.request.n}  # fmt: skip
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(job.id), json.dumps(record))
            pipe.zadd(f"{PREFIX}all", {job.id: seq})
            pipe.zadd(f"{PREFIX}status:queued", {job.id: seq})
            if job.owner is not None:
                pipe.zadd(self._owned(job.owner), {job.id: seq})
            pipe.execute()
        try:
            self._send(job.id)  # after the record is stored: a worker always finds it
        except OperationalError:
            self._forget(job.id, seq, job.owner)  # no message, no job: the caller gets 503 and nothing is left queued
            raise
        return job

    def _forget(self, job_id: str, seq: int, owner: str | None = None) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(job_id))
            pipe.zrem(f"{PREFIX}all", job_id)
            pipe.zrem(f"{PREFIX}status:queued", job_id)
            if owner is not None:
                pipe.zrem(self._owned(owner), job_id)
            pipe.execute()

    def _owned(self, owner: str) -> str:
        return f"{PREFIX}owner:{owner}"

    def _held(self, owner: str) -> int:
        """The owner's queued and running jobs (ZINTERCARD: Redis 7)."""
        return sum(int(self.redis.execute_command("ZINTERCARD", 2, f"{PREFIX}status:{status}", self._owned(owner)))
                   for status in ("queued", "running"))  # fmt: skip

    @guarded
    def get(self, job_id: str) -> Job:
        raw = self.redis.get(self._key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return self._job(raw)

    @guarded
    def list(
        self, offset: int = 0, limit: int = 20, status: JobStatus | None = None, owner: str | None = None
    ) -> tuple[builtins.list[Job], int]:
        index = f"{PREFIX}status:{status.value}" if status else f"{PREFIX}all"
        if owner is not None:  # the owner's jobs (of that status): the intersection, newest first
            both = f"{PREFIX}listing:{uuid.uuid4().hex}"
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.zinterstore(both, [index, self._owned(owner)], aggregate="MAX")
                pipe.expire(both, 10)
                pipe.execute()
            index = both
        ids = self.redis.zrevrange(index, offset, offset + limit - 1)
        raws = self.redis.mget([self._key(i.decode() if isinstance(i, bytes) else str(i)) for i in ids]) if ids else []
        total = int(self.redis.zcard(index))
        if owner is not None:
            self.redis.delete(index)
        return [self._job(raw) for raw in raws if raw is not None], total

    @guarded
    def start(self, job_id: str, worker: str) -> Job | None:
        patch = {"started": time.time(), "worker": worker, "progress": None, "batch": False}
        return self._started(self._move(job_id, "queued,running", JobStatus.RUNNING, patch, count=True))

    @guarded
    def claim_partners(self, worker: str, key: str, room: int) -> builtins.list[Job]:
        """Queued jobs of batch key `key`, oldest first, each moved to running by the same atomic script as
        `start` (a job another worker took meanwhile is skipped), while their images fit in `room`."""
        claimed: builtins.list[Job] = []
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in self.redis.zrange(f"{PREFIX}status:queued", 0,
                                                                                          -1)]  # fmt: skip
        for job_id, raw in zip(ids, self.redis.mget([self._key(i) for i in ids]) if ids else [], strict=True):
            record = json.loads(raw) if raw is not None else {}
            if room <= 0:
                break
            if record.get("batch_key") != key:
                continue
            if int(record.get("n", 1)) > room:
                break  # the next in line does not fit: later ones must not overtake it
            job = self.start_queued(job_id, worker)
            if job is not None:
                claimed.append(job)
                room -= job.request.n
        return claimed

    def start_queued(self, job_id: str, worker: str) -> Job | None:
        """`start`, for a job still queued only."""
        patch = {"started": time.time(), "worker": worker, "progress": None, "batch": None}
        return self._started(self._move(job_id, "queued", JobStatus.RUNNING, patch, count=True))

    @guarded
    def mark_batch(self, job_ids: builtins.list[str], batch: dict[str, int] | None) -> None:
        for job_id in job_ids:
            with contextlib.suppress(JobLost):  # a job taken back meanwhile: its next write stops it
                self._move(job_id, "running", JobStatus.RUNNING, {"batch": batch or False}, expect=self._fence(job_id))

    @guarded
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(f"{PREFIX}cancel:{job_id}"))

    @guarded
    def interrupt_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(f"{PREFIX}interrupt:{job_id}"))

    @guarded
    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        self._move(job_id, "running", JobStatus.RUNNING, {"progress": json.dumps(progress.__dict__)},
                   expect=self._fence(job_id))  # fmt: skip

    @guarded
    def succeed(self, job_id: str, result: dict[str, Any]) -> None:
        self._finish(job_id, "running", JobStatus.SUCCEEDED, {"finished": time.time(), "result": json.dumps(result)})

    @guarded
    def fail(self, job_id: str, error: str) -> None:
        self._finish(job_id, "running", JobStatus.FAILED, {"finished": time.time(), "error": error})

    @guarded
    def mark_cancelled(self, job_id: str) -> None:
        self._finish(job_id, "queued,running", JobStatus.CANCELLED,
                     {"finished": time.time(), "error": "cancelled by request"})  # fmt: skip

    @guarded
    def cancel(self, job_id: str) -> Job:
        self.get(job_id)
        self.redis.set(f"{PREFIX}cancel:{job_id}", 1, ex=7 * 24 * 3600)
        self._move(job_id, "queued", JobStatus.CANCELLED, {"finished": time.time(), "error": "cancelled by request",
                                                          "cancel_requested": True})  # fmt: skip
        self._move(job_id, "running", JobStatus.RUNNING, {"cancel_requested": True})
        return self.get(job_id)

    @guarded
    def interrupt(self, job_id: str) -> Job:
        if self._move(job_id, "running", JobStatus.RUNNING, {"interrupt_requested": True}) is not None:
            self.redis.set(f"{PREFIX}interrupt:{job_id}", 1, ex=7 * 24 * 3600)
        return self.get(job_id)

    @guarded
    def requeue(self, job_id: str) -> None:
        self._finish(job_id, "running", JobStatus.QUEUED, {"progress": None, "worker": None, "batch": False})

    @guarded
    def reap(self, dead_after: float, crash_limit: int) -> builtins.list[str]:
        """Take back the running jobs of workers silent for `dead_after` seconds: each is queued again (and
        sent to the broker) or, at its `crash_limit`-th such death, failed. Fenced on the dead attempt (its
        worker and attempt number), so that two reapers take a job back once, and the dead attempt, should
        it come back, writes nothing. Returns the ids taken back."""
        alive = {worker["name"] for worker in self.workers(dead_after)}
        ids = [
            i.decode() if isinstance(i, bytes) else str(i) for i in self.redis.zrange(f"{PREFIX}status:running", 0, -1)
        ]
        taken: builtins.list[str] = []
        for job_id, raw in zip(ids, self.redis.mget([self._key(i) for i in ids]) if ids else [], strict=True):
            record = json.loads(raw) if raw is not None else {}
            if not record or record.get("worker") in alive or time.time() - (record.get("started") or 0) < dead_after:
                continue
            crashes = int(record.get("crashes", 0)) + 1
            expect = {"worker": record.get("worker"), "attempts": record.get("attempts", 0)}
            with contextlib.suppress(JobLost):  # another reaper, or the worker itself, got there first
                if crashes >= crash_limit:
                    error = (f"its worker died {crashes} times while running it; not run again (the limit is "
                             f"REFINERY_CRASH_LIMIT={crash_limit})")  # fmt: skip
                    moved = self._move(job_id, "running", JobStatus.FAILED, {"finished": time.time(), "error": error,
                                       "crashes": crashes}, expect=expect)  # fmt: skip
                else:
                    patch = {"progress": None, "worker": None, "batch": False, "crashes": crashes}
                    moved = self._move(job_id, "running", JobStatus.QUEUED, patch, expect=expect)
                    if moved is not None:
                        self._send(job_id)
                if moved is not None:
                    log.warning("Job %s taken back from %s (silent over %.0f s): %s", job_id, record.get("worker"),
                                dead_after, moved.status.value)  # fmt: skip
                    taken.append(job_id)
        return taken

    @guarded
    def position(self, job_id: str) -> int | None:
        rank: Any = self.redis.zrank(f"{PREFIX}status:queued", job_id)
        return None if rank is None else int(rank) + 1

    @guarded
    def depth(self) -> int:
        return int(self.redis.zcard(f"{PREFIX}status:queued")) + int(self.redis.zcard(f"{PREFIX}status:running"))

    @guarded
    def counts(self) -> dict[str, int]:
        return {status.value: int(self.redis.zcard(f"{PREFIX}status:{status.value}")) for status in JobStatus}

    def claim_next(self, worker: str) -> Job | None:
        return None  # the broker hands jobs to workers; nothing is claimed from the store

    def recover(self, crash_limit: int = 3) -> builtins.list[str]:
        return []  # the broker redelivers the messages of dead workers (acks_late)

    async def relay_events(self, events: JobEvents, stop: asyncio.Event) -> None:
        await forward_events(self.settings, events, stop)

    @guarded
    def durability_warnings(self) -> builtins.list[str]:
        """What in this Redis's configuration would lose or drop jobs (docs/scale-out.md "Redis"): no append-only
        file (a restart loses every queued job) or an eviction policy (records dropped under memory pressure)."""
        try:
            config = {**self.redis.config_get("appendonly"), **self.redis.config_get("maxmemory-policy")}
        except redis.ResponseError as error:  # managed services often rename or disable CONFIG
            return [f"cannot read Redis's CONFIG ({error}): make sure appendonly is yes and maxmemory-policy is "
                    "noeviction, or a restart or memory pressure loses jobs"]  # fmt: skip
        warnings = []
        if str(config.get("appendonly")) != "yes":
            warnings.append("Redis runs without its append-only file (appendonly no): a Redis restart loses every "
                            "queued job; set appendonly yes")  # fmt: skip
        policy = str(config.get("maxmemory-policy"))
        if policy != "noeviction":
            warnings.append(f"Redis may evict keys (maxmemory-policy {policy}): job records and queued messages "
                            "can vanish under memory pressure; set maxmemory-policy noeviction")  # fmt: skip
        return warnings

    @guarded
    def workers(self, within: float = 30.0) -> builtins.list[dict[str, Any]]:
        """Workers that reported in the last `within` seconds: name, device, precision, running job."""
        now = time.time()
        rows = [json.loads(raw) for raw in self.redis.hvals(f"{PREFIX}workers")]
        return sorted((row for row in rows if now - row["seen"] < within), key=lambda row: row["name"])

    def close(self) -> None:
        self.redis.close()
