"""Async client for the Modulate Platform API: file submissions, realtime sessions, job status.

Auth is the `accountuuid` + `apikey` header pair; bodies are JSON with base64 audio. The wire
field names live in `_platform_wire.py`.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from . import _platform_wire as wire
from ._constants import (
    DEFAULT_PLATFORM_BASE_URL,
    DEFAULT_PLATFORM_TIMEOUT,
    MAX_PLATFORM_BYTES,
    PLATFORM_EXTENSIONS,
)
from ._http import _BaseHTTPClient, _check_api_key, _json_parser
from .errors import BadInput
from .models import JobStatus, RealtimeSession, Submission

__all__ = ["PlatformClient", "PlatformFlags"]

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

    def wire(self) -> dict[str, bool]:
        return {name: True for name in wire.FLAG_NAMES if getattr(self, name)}


class PlatformClient(_BaseHTTPClient):
    """Client for `cloud-processing-api.modulate.ai`; use as `async with PlatformClient(...)`."""

    def __init__(
        self,
        *,
        account_uuid: str,
        api_key: SecretStr,
        base_url: str = DEFAULT_PLATFORM_BASE_URL,
        timeout: httpx.Timeout = DEFAULT_PLATFORM_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not account_uuid:
            _check_api_key(api_key)  # a bad key is still reported first
            raise ValueError("account_uuid is required")
        super().__init__(
            api_key=api_key, base_url=base_url, timeout=timeout, http_client=http_client
        )
        self._account_uuid = account_uuid

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
            self._base_url, self._headers(), audio, filename, flags, job_id, finalize
        )
        return await self._send(ENDPOINT, request, _json_parser(Submission))

    async def finalize_job(self, job_id: str) -> Submission:
        """Finalize a multi-file job without a further file (its last file was refused)."""
        if not job_id:
            raise ValueError("job_id is required")
        request = _build_finalize(self._base_url, self._headers(), job_id)
        return await self._send(ENDPOINT, request, _json_parser(Submission))

    async def create_realtime_session(self, flags: PlatformFlags) -> RealtimeSession:
        """Create a realtime job; its `realtime_url` is for the Pipecat client SDK."""
        request = _build_realtime(self._base_url, self._headers(), flags)
        return await self._send(ENDPOINT, request, _json_parser(RealtimeSession))

    async def job_status(self, job_id: str) -> JobStatus:
        """Status of a job and of each of its files."""
        if not job_id:
            raise ValueError("job_id is required")
        request = _build_job_status(self._base_url, self._headers(), job_id)
        return await self._send(ENDPOINT, request, _json_parser(JobStatus))

    def _headers(self) -> dict[str, str]:
        return {
            wire.HEADER_ACCOUNT: self._account_uuid,
            wire.HEADER_KEY: self._api_key.get_secret_value(),
        }


def _build_submit(
    base_url: str,
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
        wire.AUDIO_BASE64: base64.b64encode(audio).decode("ascii"),
        wire.FILE_EXTENSION: ext,
        wire.FILENAME: filename.rsplit("/", 1)[-1],
        wire.FLAGS: flags.wire(),
        wire.SUBMISSION_TYPE: wire.TYPE_SINGLE_FILE if single else wire.TYPE_MULTI_FILE,
    }
    if not single:
        if job_id is not None:
            body[wire.JOB_ID] = job_id
        body[wire.FINALIZE_JOB] = finalize
    return httpx.Request("POST", base_url + wire.SUBMIT_PATH, headers=headers, json=body)


def _build_finalize(base_url: str, headers: dict[str, str], job_id: str) -> httpx.Request:
    body = {
        wire.SUBMISSION_TYPE: wire.TYPE_MULTI_FILE,
        wire.JOB_ID: job_id,
        wire.FINALIZE_JOB: True,
    }
    return httpx.Request("POST", base_url + wire.SUBMIT_PATH, headers=headers, json=body)


def _build_realtime(base_url: str, headers: dict[str, str], flags: PlatformFlags) -> httpx.Request:
    body = {wire.FLAGS: flags.wire(), wire.SUBMISSION_TYPE: wire.TYPE_REALTIME}
    return httpx.Request("POST", base_url + wire.SUBMIT_PATH, headers=headers, json=body)


def _build_job_status(base_url: str, headers: dict[str, str], job_id: str) -> httpx.Request:
    path = wire.JOB_STATUS_PATH.format(job_id=quote(job_id, safe=""))
    return httpx.Request("GET", base_url + path, headers=headers)


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
