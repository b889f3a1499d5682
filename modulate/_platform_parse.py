"""Tolerant readers of the Platform API's answers, driven by the `PlatformWire` settings.

The job-status schema is not published (API_CONTRACT.md §9.2), so a body is read as far as
it can be: files flat or nested under a result field, `transcript` a string or an object,
per-file status present or absent (then the job's stands). A body that cannot be read becomes
`outcome="unreadable"` with a `problem` naming what was expected (and the setting that says
so) and what came: key names and short status values only, never result text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from ._platform_wire import PlatformWire
from .errors import BadInput
from .models import JobFile, JobOutcome, JobStatus, Submission

__all__ = ["job_status_from_response", "parse_job_status", "submission_from_response"]

ENDPOINT = "platform"
_MAX_SHOWN = 40


def submission_from_response(response: httpx.Response, wire: PlatformWire) -> Submission:
    """The submission answer; one without a job id is refused (never sent again: it was paid)."""
    try:
        body = response.json()
    except ValueError:
        problem = f"the answer is not JSON ({_body_kind(response)})"
        raise _unreadable_submission(response, problem) from None
    if not isinstance(body, Mapping):
        raise _unreadable_submission(response, f"expected a JSON object, got {_kind(body)}")
    job_id = _scalar(body.get(wire.job_id_field))
    if job_id is None:
        raise _unreadable_submission(
            response,
            f"expected the job id at {wire.job_id_field!r} (setting wire.job_id_field), "
            f"got keys {_keys(body)}",
        )
    status = body.get(wire.status_field)
    calls = body.get("api_calls_charged")
    return Submission(
        job_id=job_id,
        file_id=_first_scalar(body, wire.file_id_fields),
        status=status if isinstance(status, str) else None,
        api_calls_charged=calls if isinstance(calls, int) else None,
        estimated_processing_time=_str_or_none(body.get("estimated_processing_time")),
    )


def job_status_from_response(response: httpx.Response, wire: PlatformWire) -> JobStatus:
    """The job status of a 2xx answer; a body that is not JSON is `unreadable`, not an error."""
    try:
        body = response.json()
    except ValueError:
        return JobStatus(outcome="unreadable", problem=f"not JSON ({_body_kind(response)})")
    return parse_job_status(body, wire)


def parse_job_status(body: Any, wire: PlatformWire) -> JobStatus:
    """Read a decoded job-status body with `wire`; never raises on the body's shape."""

    def unreadable(problem: str, status: str | None = None) -> JobStatus:
        return JobStatus(outcome="unreadable", problem=problem, status=status, raw=body)

    if not isinstance(body, Mapping):
        return unreadable(f"expected a JSON object, got {_kind(body)}")
    status = body.get(wire.status_field)
    if not isinstance(status, str):
        return unreadable(
            f"expected the job's status (a string) at {wire.status_field!r} (setting "
            f"wire.status_field), got {_kind(status)}; the body has keys {_keys(body)}"
        )
    outcome = _outcome(status, wire)
    if outcome is None:
        return unreadable(
            f"job status {status[:_MAX_SHOWN]!r} is in none of wire.completed_statuses, "
            "wire.failed_statuses and wire.running_statuses",
            status,
        )
    files_key = next((k for k in wire.files_fields if body.get(k) is not None), None)
    items: Any = body[files_key] if files_key else []
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        return unreadable(
            f"expected a list of objects at {files_key!r} (setting wire.files_fields), "
            f"got {_kind(items)}",
            status,
        )
    files = [_file(item, wire) for item in items]
    if not files and _has_result(body, wire):
        # A single-file job may answer with its one result at the top level.
        files = [_file({k: v for k, v in body.items() if k != wire.status_field}, wire)]
    return JobStatus(
        job_id=_scalar(body.get(wire.job_id_field)),
        status=status,
        outcome=outcome,
        files=files,
        error=_first_error(body, wire),
        raw=body,
    )


def _file(item: Mapping[str, Any], wire: PlatformWire) -> JobFile:
    status = item.get(wire.status_field)
    status = status if isinstance(status, str) else None
    nested = next(
        (item[k] for k in wire.result_fields if isinstance(item.get(k), Mapping)), None
    )
    bookkeeping = {wire.status_field, wire.filename_field, *wire.file_id_fields,
                   *wire.error_fields, *wire.result_fields}
    result = dict(nested) if nested is not None else {
        k: v for k, v in item.items() if k not in bookkeeping
    }
    outcome = _outcome(status, wire) if status else None
    return JobFile(
        file_id=_first_scalar(item, wire.file_id_fields),
        filename=_str_or_none(item.get(wire.filename_field)),
        status=status,
        outcome=None if outcome == "unreadable" else outcome,
        transcript_text=_transcript(result, wire),
        result=result,
        error=_first_error(item, wire),
    )


def _outcome(status: str, wire: PlatformWire) -> JobOutcome | None:
    value = _status_word(status)
    for names, outcome in (
        (wire.completed_statuses, "completed"),
        (wire.failed_statuses, "failed"),
        (wire.running_statuses, "running"),
    ):
        if value in (_status_word(n) for n in names):
            return outcome  # type: ignore[return-value]
    return None


def _status_word(status: str) -> str:
    """One spelling of a status: "In Progress", "in-progress" and "in_progress" alike."""
    return re.sub(r"[\s-]+", "_", status.strip().lower())


def _transcript(result: Mapping[str, Any], wire: PlatformWire) -> str | None:
    for key in wire.transcript_fields:
        value = result.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping) and isinstance(value.get("text"), str):
            return str(value["text"])
    return None


def _has_result(body: Mapping[str, Any], wire: PlatformWire) -> bool:
    return any(isinstance(body.get(k), Mapping) for k in wire.result_fields) or (
        _transcript(body, wire) is not None
    )


def _first_error(item: Mapping[str, Any], wire: PlatformWire) -> str | None:
    for key in wire.error_fields:
        value = item.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (Mapping, list)) and value:
            return json.dumps(value, sort_keys=True)
    return None


def _first_scalar(item: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    return next((v for v in (_scalar(item.get(k)) for k in keys) if v is not None), None)


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    return str(value) if isinstance(value, (str, int)) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return "a string" if isinstance(value, str) else f"a JSON {type(value).__name__}"


def _keys(body: Mapping[str, Any]) -> list[str]:
    return sorted(str(k)[:_MAX_SHOWN] for k in body)[:20]


def _body_kind(response: httpx.Response) -> str:
    kind = response.headers.get("content-type", "no content type")
    return f"{kind}, {len(response.content)} bytes"


def _unreadable_submission(response: httpx.Response, problem: str) -> BadInput:
    return BadInput(
        f"platform: unreadable submission answer: {problem}",
        endpoint=ENDPOINT,
        status=response.status_code,
        detail=f"unreadable response: {problem}",
    )
