"""Live state of the emulator: config, admission rules, counters and Platform jobs.

No FastAPI here. Admission is atomic because every check-and-increment runs on the server's one
event loop without an await in between. Tests in another thread may read `stats()` and call the
`patch_*`/`reset_*` methods; those are plain attribute updates.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from emulator.config import MODELS, EmulatorConfig, Faults, Latency, OrgConfig

__all__ = [
    "REJECTION_CLASSES",
    "UNKNOWN_ORG",
    "EmulatorState",
    "FaultKind",
    "Job",
    "JobFile",
    "ModelStats",
]

REJECTION_CLASSES: tuple[str, ...] = (
    "concurrency", "monthly", "auth", "not_enabled", "bad_input", "fault_5xx", "dropped", "slow",
    "garbled",
)
# Rejections of keys that match no org are counted under this pseudo-org.
UNKNOWN_ORG = "_unknown"

FaultKind = Literal["5xx", "drop", "slow", "garbled"]


@dataclass
class ModelStats:
    """Counters of one org+model. `audio_seconds` is the month's usage, not reset by stats/reset."""

    in_flight: int = 0
    max_in_flight: int = 0
    requests: int = 0
    completed: int = 0
    audio_seconds: float = 0.0
    rejections: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "requests": self.requests,
            "completed": self.completed,
            "audio_seconds": round(self.audio_seconds, 3),
            "rejections": {cls: self.rejections.get(cls, 0) for cls in REJECTION_CLASSES},
        }


@dataclass
class JobFile:
    """One file of a Platform job; `result` is computed at upload time, shown once completed."""

    file_id: str
    filename: str
    result: dict[str, Any]


@dataclass
class Job:
    """A Platform job. `finalized_at` is a monotonic time; the status is derived when polled."""

    job_id: str
    org: str
    submission_type: str
    files: list[JobFile] = field(default_factory=list)
    finalized_at: float | None = None
    token: str | None = None


class EmulatorState:
    """Config, counters, admission and Platform jobs of one emulator instance."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._initial = config.model_copy(deep=True)
        self._lock = threading.Lock()  # guards dict resizes against readers in other threads
        self.reset()

    def reset(self, config: EmulatorConfig | None = None) -> None:
        """Back to a fresh start: the initial (or given) config, no counters, usage or jobs.

        Only call it while no request is in flight (between tests).
        """
        if config is not None:
            self._initial = config.model_copy(deep=True)
        self.config = self._initial.model_copy(deep=True)
        self.rng = random.Random(self.config.seed)
        self.jobs: dict[str, Job] = {}
        self.platform: Counter[str] = Counter()
        with self._lock:
            self._stats: dict[tuple[str, str], ModelStats] = {}

    # --- lookup -------------------------------------------------------------------------
    def org_for_key(self, key: str) -> OrgConfig | None:
        """The org owning Velma-2 key `key`, or None."""
        for org in self.config.orgs:
            if key in org.velma_keys:
                return org
        return None

    def org_for_platform(self, account_uuid: str, api_key: str) -> OrgConfig | None:
        """The org whose Platform account and key both match, or None."""
        for org in self.config.orgs:
            if org.platform_account_uuid == account_uuid and org.platform_api_key == api_key:
                return org
        return None

    def model_stats(self, org: str, model: str) -> ModelStats:
        key = (org, model)
        stats = self._stats.get(key)
        if stats is None:
            with self._lock:
                stats = self._stats.setdefault(key, ModelStats())
        return stats

    # --- admission ----------------------------------------------------------------------
    def reject(self, org: str, model: str, cls: str) -> None:
        """Count a request of `org`/`model` rejected for class `cls`."""
        stats = self.model_stats(org, model)
        stats.requests += 1
        stats.rejections[cls] += 1

    def check_access(self, org: OrgConfig, model: str) -> str | None:
        """"not_enabled" if `model` is off for `org`, else None (no counting)."""
        return None if org.limits(model).enabled else "not_enabled"

    def admit(self, org: OrgConfig, model: str, audio_seconds: float) -> str | None:
        """Try to take a slot; return None when admitted, else the rejection class.

        Order: enabled, monthly (used >= limit), concurrency (in flight >= limit, rejected at
        once, never queued). When admitted, the audio is charged to the month at once.
        Must run on the event loop without awaits, which is what makes it atomic.
        """
        limits = org.limits(model)
        stats = self.model_stats(org.name, model)
        cls: str | None = None
        if not limits.enabled:
            cls = "not_enabled"
        elif stats.audio_seconds >= limits.monthly_audio_hours * 3600.0:
            cls = "monthly"
        elif stats.in_flight >= limits.concurrent:
            cls = "concurrency"
        if cls is not None:
            self.reject(org.name, model, cls)
            return cls
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        stats.audio_seconds += audio_seconds
        return None

    def charge(self, org: str, model: str, audio_seconds: float) -> None:
        """Add audio seconds to the month's usage (streams charge as bytes arrive)."""
        self.model_stats(org, model).audio_seconds += audio_seconds

    def release(self, org: str, model: str, *, completed: bool, fault: str | None = None) -> None:
        """Give the slot back; count a completion, or the fault class that ended the call."""
        stats = self.model_stats(org, model)
        stats.in_flight = max(0, stats.in_flight - 1)
        if completed:
            stats.completed += 1
        if fault is not None:
            stats.rejections[fault] += 1

    # --- randomness ---------------------------------------------------------------------
    def draw_latency(self, audio_seconds: float = 0.0) -> float:
        """Seconds an accepted batch call holds its slot: max(0, mean ± uniform jitter),
        plus `per_audio_s` for each second of its audio."""
        lat = self.config.latency
        drawn = max(0.0, lat.mean_s + self.rng.uniform(-lat.jitter_s, lat.jitter_s))
        return drawn + lat.per_audio_s * audio_seconds

    def draw_fault(self) -> FaultKind | None:
        """One seeded draw per accepted request: 5xx, drop, slow, then garbled, else None."""
        faults = self.config.faults
        roll = self.rng.random()
        if roll < faults.error_5xx_rate:
            return "5xx"
        roll -= faults.error_5xx_rate
        if roll < faults.drop_rate:
            return "drop"
        roll -= faults.drop_rate
        if roll < faults.slow_rate:
            return "slow"
        roll -= faults.slow_rate
        if roll < faults.garbled_rate:
            return "garbled"
        return None

    # --- platform jobs ------------------------------------------------------------------
    def job_status(self, job: Job) -> str:
        """accepting_files → processing → completed | failed, derived from the clock."""
        if job.finalized_at is None:
            # a realtime job is "processing" while its stream is open
            realtime = job.submission_type == "realtime_websocket"
            return "processing" if realtime else "accepting_files"
        if time.monotonic() - job.finalized_at < self.config.platform_job_seconds:
            return "processing"
        if any("fail" in f.filename for f in job.files):
            return "failed"
        return "completed"

    # --- control ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Snapshot: {"orgs": {org: {model: counters}}, "platform": {...}}."""
        orgs: dict[str, dict[str, Any]] = {}
        for org in self.config.orgs:
            orgs[org.name] = {m: self.model_stats(org.name, m).as_dict() for m in MODELS}
        with self._lock:
            items = list(self._stats.items())
        for (org_name, model), stats in items:
            orgs.setdefault(org_name, {})[model] = stats.as_dict()
        return {
            "orgs": orgs,
            "platform": {
                "submissions": self.platform["submissions"],
                "polls": self.platform["polls"],
                "jobs": len(self.jobs),
            },
        }

    def reset_stats(self) -> None:
        """Zero the counters and max_in_flight (to the current in_flight); keep usage."""
        with self._lock:
            items = list(self._stats.values())
        for stats in items:
            stats.requests = 0
            stats.completed = 0
            stats.rejections.clear()
            stats.max_in_flight = stats.in_flight
        self.platform.clear()

    def reset_usage(self) -> None:
        """The month rolls over: audio seconds used back to 0 for every org+model."""
        with self._lock:
            items = list(self._stats.values())
        for stats in items:
            stats.audio_seconds = 0.0

    def patch_config(self, changes: dict[str, Any]) -> None:
        """Apply any of latency, faults, detail_family, platform_job_seconds, platform_wire."""
        allowed = {"latency", "faults", "detail_family", "platform_job_seconds", "platform_wire"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        data = self.config.model_dump()
        if "latency" in changes:
            data["latency"] = Latency.model_validate({**data["latency"], **changes["latency"]})
        if "faults" in changes:
            data["faults"] = Faults.model_validate({**data["faults"], **changes["faults"]})
        for name in ("detail_family", "platform_job_seconds", "platform_wire"):
            if name in changes:
                data[name] = changes[name]
        new = EmulatorConfig.model_validate(data)
        self.config.latency = new.latency
        self.config.faults = new.faults
        self.config.detail_family = new.detail_family
        self.config.platform_job_seconds = new.platform_job_seconds
        self.config.platform_wire = new.platform_wire

    def patch_model(self, org: str, model: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply any of enabled, concurrent, monthly_audio_hours to one org+model."""
        unknown = set(changes) - {"enabled", "concurrent", "monthly_audio_hours"}
        if unknown:
            raise ValueError(f"unknown limit fields {sorted(unknown)}")
        limits = self.config.org(org).limits(model)
        merged = limits.model_validate({**limits.model_dump(), **changes})
        for name, value in merged.model_dump().items():
            setattr(limits, name, value)
        return limits.model_dump()
