"""Wire names of the Modulate Platform API, in one place (API_CONTRACT.md §9: partly unknown).

Only `audio_base64`, `file_extension`, `flags{emotion_annotation, demographics}` and `filename`
are documented; `submission_type`, `job_id`, `finalize_job` and the two other flags are our
reading of the auth page. Change them here only.
"""

from __future__ import annotations

__all__ = [
    "AUDIO_BASE64",
    "FILENAME",
    "FILE_EXTENSION",
    "FINALIZE_JOB",
    "FLAGS",
    "FLAG_NAMES",
    "HEADER_ACCOUNT",
    "HEADER_KEY",
    "JOB_ID",
    "JOB_STATUS_PATH",
    "SUBMISSION_TYPE",
    "SUBMIT_PATH",
    "TYPE_MULTI_FILE",
    "TYPE_REALTIME",
    "TYPE_SINGLE_FILE",
]

SUBMIT_PATH = "/api_service"
JOB_STATUS_PATH = "/api_service/job_status/{job_id}"
HEADER_ACCOUNT = "accountuuid"
HEADER_KEY = "apikey"

AUDIO_BASE64 = "audio_base64"
FILE_EXTENSION = "file_extension"
FILENAME = "filename"
FLAGS = "flags"
SUBMISSION_TYPE = "submission_type"
JOB_ID = "job_id"
FINALIZE_JOB = "finalize_job"

TYPE_SINGLE_FILE = "single_file"
TYPE_MULTI_FILE = "multi_file"
TYPE_REALTIME = "realtime_websocket"

FLAG_NAMES: tuple[str, ...] = (
    "emotion_annotation",
    "demographics",
    "synthetic_voice_detection",
    "behavioral_insights",
)
