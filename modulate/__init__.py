"""Async clients for Modulate's Velma-2 model APIs and Platform API, with error classification.

Knows nothing of Prefect, S3 or Parquet. See `errors` for the taxonomy and `limits` for the
retry policy and the one retry loop, `gate` for the evidence about an org's limits.
"""

from __future__ import annotations

from .batch import BatchClient, CustomTerm, RedactionOptions, STTOptions, wav_duration_ms
from .errors import (
    AuthError,
    BadInput,
    ConcurrencyLimited,
    ModelNotEnabled,
    ModulateError,
    MonthlyLimitReached,
    Transient,
    UnreadableResponse,
    classify,
    redact_url,
)
from .gate import ModelGate
from .limits import (
    Deferred,
    GiveUp,
    Retry,
    RetryPolicy,
    RetryRecord,
    call_with_retries,
    decide,
    mark_admitted,
    parse_retry_after,
)
from .models import (
    Done,
    FrameEvent,
    JobFile,
    JobOutcome,
    JobStatus,
    PartialUtterance,
    RealtimeSession,
    RedactedAudioWindow,
    Redaction,
    RedactionMetadata,
    StreamEvent,
    Submission,
    SVDFrame,
    SVDResult,
    Transcript,
    Utterance,
    UtteranceEvent,
    VFastTranscript,
)
from .platform import PlatformClient, PlatformFlags, PlatformWire
from .streaming import RAW_AUDIO_FORMATS, StreamingClient, StreamParams

__all__ = [
    "RAW_AUDIO_FORMATS",
    "AuthError",
    "BadInput",
    "BatchClient",
    "ConcurrencyLimited",
    "CustomTerm",
    "Deferred",
    "Done",
    "FrameEvent",
    "GiveUp",
    "JobFile",
    "JobOutcome",
    "JobStatus",
    "ModelGate",
    "ModelNotEnabled",
    "ModulateError",
    "MonthlyLimitReached",
    "PartialUtterance",
    "PlatformClient",
    "PlatformFlags",
    "PlatformWire",
    "RealtimeSession",
    "RedactedAudioWindow",
    "Redaction",
    "RedactionMetadata",
    "RedactionOptions",
    "Retry",
    "RetryPolicy",
    "RetryRecord",
    "STTOptions",
    "SVDFrame",
    "SVDResult",
    "StreamEvent",
    "StreamParams",
    "StreamingClient",
    "Submission",
    "Transcript",
    "Transient",
    "UnreadableResponse",
    "Utterance",
    "UtteranceEvent",
    "VFastTranscript",
    "call_with_retries",
    "classify",
    "decide",
    "mark_admitted",
    "parse_retry_after",
    "redact_url",
    "wav_duration_ms",
]
