"""Async client for the Modulate Platform API: file submissions, realtime sessions, job status.

Auth is the `accountuuid` + `apikey` header pair; bodies are JSON with base64 audio. Every
wire name the contract does not publish is a `PlatformWire` setting (`_platform_wire.py`);
answers are read tolerantly by `_platform_parse.py`.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ._constants import (
    DEFAULT_PLATFORM_BASE_URL,
    DEFAULT_PLATFORM_DEADLINE,
    DEFAULT_PLATFORM_TIMEOUT,
    MAX_PLATFORM_BYTES,
    PLATFORM_EXTENSIONS,
)
from ._http import _BaseHTTPClient, _check_api_key, _json_parser
from ._platform_parse import job_status_from_response, submission_from_response
from ._platform_wire import DEFAULT_WIRE, PlatformWire
from .errors import BadInput
from .models import JobStatus, RealtimeSession, Submission

__all__ = ["PlatformClient", "PlatformFlags", "PlatformWire"]

ENDPOINT = "platform"


class PlatformFlags(BaseModel):
    """Optional Platform analyses; each costs extra API calls. Only flags set are sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    emotion_annotation: bool = Field(False, description="Emotion per segment (+1 API call).")
    demographics: bool = Field(False, description="Age range and gender (+1 API call).")
    synthetic_voice_detection: bool = Field(
        False, description="A synthetic-voice verdict per file (+1 API call)."
    )
    behavioral_insights: bool = Field(
        False, description="Sentiment, engagement and interruptions (+1 API call)."
    )

    def wire(self, wire: PlatformWire = DEFAULT_WIRE) -> dict[str, bool]:
        """The flags set, under their wire names."""
        names = type(self).model_fields
        return {wire.flag_names.get(name, name): True for name in names if getattr(self, name)}


class PlatformClient(_BaseHTTPClient):
    """Client for `cloud-processing-api.modulate.ai`; use as `async with PlatformClient(...)`."""

    def __init__(
        self,
        *,
        account_uuid: str,
        api_key: SecretStr,
        base_url: str = DEFAULT_PLATFORM_BASE_URL,
        timeout: httpx.Timeout = DEFAULT_PLATFORM_TIMEOUT,
        deadline: float = DEFAULT_PLATFORM_DEADLINE,
        wire: PlatformWire = DEFAULT_WIRE,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not account_uuid:
            _check_api_key(api_key)  # a bad key is still reported first
            raise ValueError("account_uuid is required")
        super().__init__(
            api_key=api_key, base_url=base_url, timeout=timeout, deadline=deadline,
            http_client=http_client,
        )
        self._account_uuid = account_uuid
        self.wire = wire

    async def submit_file(
        self,
        audio: bytes,
        filename: str,
        *,
        flags: PlatformFlags,
        job_id: str | None = None,
        finalize: bool = True,
    ) -> Submission:
        """Submit one file: a single-file job when `job_id` is None and `finalize`, else one
        file of a multi-file job (`finalize=True` on the last one)."""
        request = _build_submit(
            self._base_url, self.wire, self._headers(), audio, filename, flags, job_id, finalize
        )
        return await self._send(ENDPOINT, request, self._read_submission)

    async def finalize_job(self, job_id: str) -> Submission:
        """Finalize a multi-file job without a further file (its last file was refused)."""
        if not job_id:
            raise ValueError("job_id is required")
        request = _build_finalize(self._base_url, self.wire, self._headers(), job_id)
        return await self._send(ENDPOINT, request, self._read_submission)

    async def create_realtime_session(self, flags: PlatformFlags) -> RealtimeSession:
        """Create a realtime job; its `realtime_url` is for the Pipecat client SDK."""
        request = _build_realtime(self._base_url, self.wire, self._headers(), flags)
        return await self._send(ENDPOINT, request, _json_parser(RealtimeSession))

    async def job_status(self, job_id: str) -> JobStatus:
        """Status of a job and of each of its files; `outcome="unreadable"` (with `problem`)
        when the answer's body cannot be read with the wire settings."""
        if not job_id:
            raise ValueError("job_id is required")
        request = _build_job_status(self._base_url, self.wire, self._headers(), job_id)
        return await self._send(ENDPOINT, request, self._read_status)

    def _read_submission(self, response: httpx.Response) -> Submission:
        return submission_from_response(response, self.wire)

    def _read_status(self, response: httpx.Response) -> JobStatus:
        return job_status_from_response(response, self.wire)

    def _headers(self) -> dict[str, str]:
        return {
            self.wire.account_header: self._account_uuid,
            self.wire.key_header: self._api_key.get_secret_value(),
        }


def _build_submit(
    base_url: str,
    wire: PlatformWire,
    headers: dict[str, str],
    audio: bytes,
    filename: str,
    flags: PlatformFlags,
    job_id: str | None,
    finalize: bool,
) -> httpx.Request:
    ext = _precheck(audio, filename)
    single = job_id is None and finalize
    body: dict[str, Any] = {
        wire.audio_field: base64.b64encode(audio).decode("ascii"),
        wire.extension_field: ext,
        wire.filename_field: filename.rsplit("/", 1)[-1],
        wire.flags_field: flags.wire(wire),
        **_kind(wire, wire.single_file_type if single else wire.multi_file_type),
    }
    if not single:
        if job_id is not None:
            body[wire.job_id_field] = job_id
        body[wire.finalize_field] = finalize
    return httpx.Request("POST", base_url + wire.submit_path, headers=headers, json=body)


def _build_finalize(
    base_url: str, wire: PlatformWire, headers: dict[str, str], job_id: str
) -> httpx.Request:
    body = {
        **_kind(wire, wire.multi_file_type),
        wire.job_id_field: job_id,
        wire.finalize_field: True,
    }
    return httpx.Request("POST", base_url + wire.submit_path, headers=headers, json=body)


def _build_realtime(
    base_url: str, wire: PlatformWire, headers: dict[str, str], flags: PlatformFlags
) -> httpx.Request:
    body = {wire.flags_field: flags.wire(wire), **_kind(wire, wire.realtime_type)}
    return httpx.Request("POST", base_url + wire.submit_path, headers=headers, json=body)


def _build_job_status(
    base_url: str, wire: PlatformWire, headers: dict[str, str], job_id: str
) -> httpx.Request:
    path = wire.job_status_path.format(job_id=quote(job_id, safe=""))
    return httpx.Request("GET", base_url + path, headers=headers)


def _kind(wire: PlatformWire, value: str) -> dict[str, str]:
    """The submission_type field, unless the settings send none."""
    return {wire.submission_type_field: value} if wire.submission_type_field else {}


def _precheck(audio: bytes, filename: str) -> str:
    if not isinstance(audio, (bytes, bytearray)):
        raise ValueError("audio must be bytes")
    name = filename.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""

    def bad(message: str, detail: str) -> BadInput:
        return BadInput(f"platform: {message}", endpoint=ENDPOINT, detail=detail)

    if not audio:
        raise bad("the file is empty; skip it or re-export the audio", "empty file")
    if len(audio) > MAX_PLATFORM_BYTES:
        raise bad(
            f"the file is {len(audio)} bytes, over the Platform's 5 MB limit (~5 minutes);"
            " split it or use the Velma-2 batch endpoints",
            "file too large",
        )
    if ext not in PLATFORM_EXTENSIONS:
        raise bad(
            f"unsupported extension {ext!r}; the Platform takes "
            f"{', '.join(sorted(PLATFORM_EXTENSIONS))} (convert the audio)",
            "unsupported file format",
        )
    return ext
