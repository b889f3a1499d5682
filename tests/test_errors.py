"""classify(): every status, detail (both families, string and list) and close code in
API_CONTRACT.md maps to its class; unmatched inputs get the documented defaults."""

from __future__ import annotations

import email.utils
import pickle
import time

import httpx
import pytest
import websockets.datastructures
import websockets.exceptions
import websockets.frames
import websockets.http11

from modulate.errors import (
    AuthError,
    BadInput,
    ConcurrencyLimited,
    ModelNotEnabled,
    ModulateError,
    MonthlyLimitReached,
    Transient,
    classify,
    redact_url,
)

MISSING_KEY_2026 = [{"loc": ["header", "X-API-Key"], "msg": "Field required", "type": "missing"}]
NOT_PERMITTED = "This request is not permitted."
CREDITS = "Insufficient credits."
UNSUPPORTED = (
    "Unsupported file format. Supported formats: .aac, .aiff, .flac, .mov, .mp3, .mp4, .ogg,"
    " .opus, .wav, .webm."
)
CORRUPT = "The audio could not be processed. It may be corrupted or in an unsupported format."
BATCH = ("stt", "vfast", "pii")

# (endpoint, status, detail, expected class, quota_suspect or None)
HTTP_CASES: list[tuple[str, int, object, type[ModulateError], bool | None]] = [
    # legacy family, batch
    *[(e, 401, "Missing API key.", AuthError, None) for e in BATCH],
    *[(e, 401, "Invalid API key.", AuthError, None) for e in BATCH],
    *[
        (e, 403, "Model access not enabled for this organization.", ModelNotEnabled, None)
        for e in (*BATCH, "svd")
    ],
    *[(e, 403, "Monthly usage limit reached.", MonthlyLimitReached, None) for e in (*BATCH, "svd")],
    *[(e, 429, "Concurrent request limit exceeded.", ConcurrencyLimited, False) for e in BATCH],
    ("svd", 403, "Invalid API key.", AuthError, None),
    ("svd", 403, "Missing API key.", AuthError, None),
    ("svd", 403, "Concurrent request limit exceeded.", ConcurrencyLimited, False),
    # troubleshooting wording variants
    ("stt", 403, "monthly limit reached", MonthlyLimitReached, None),
    ("stt", 403, "model access not enabled", ModelNotEnabled, None),
    ("stt", 429, "Too many requests", ConcurrencyLimited, False),
    ("stt", 429, "Rate limit exceeded", ConcurrencyLimited, False),
    ("stt", 429, "Monthly quota exhausted", MonthlyLimitReached, None),
    # 2026 family
    *[(e, 422, MISSING_KEY_2026, AuthError, None) for e in (*BATCH, "svd")],
    *[(e, 401, "Invalid API key.", AuthError, None) for e in BATCH],
    # A 403 that does not say why: model not enabled or a limit (the vendor's auth page).
    *[(e, 403, NOT_PERMITTED, ConcurrencyLimited, True) for e in (*BATCH, "svd")],
    *[(e, 403, "Access denied.", ConcurrencyLimited, True) for e in (*BATCH, "svd")],
    *[(e, 429, CREDITS, ConcurrencyLimited, True) for e in (*BATCH, "svd")],
    # bad input
    *[(e, 400, UNSUPPORTED, BadInput, None) for e in (*BATCH, "svd")],
    *[(e, 400, "The uploaded file is empty.", BadInput, None) for e in (*BATCH, "svd")],
    *[(e, 400, CORRUPT, BadInput, None) for e in (*BATCH, "svd")],
    ("stt", 400, "Invalid language='english'. Expected an ISO 639-1 code.", BadInput, None),
    ("stt", 400, "Invalid configuration.", BadInput, None),
    ("pii", 400, "Invalid request.", BadInput, None),
    ("svd", 422, "The audio is too short to analyze.", BadInput, None),
    ("svd", 422, CORRUPT, BadInput, None),
    (
        "stt",
        422,
        [{"loc": ["body", "upload_file"], "msg": "Field required", "type": "missing"}],
        BadInput,
        None,
    ),
    ("stt", 413, "The uploaded file is too large. Maximum size is 100 MB.", BadInput, None),
    # transient
    *[(e, 500, "Internal server error", Transient, None) for e in (*BATCH, "svd", "platform")],
    ("stt", 502, "Unable to validate request. Please try again.", Transient, None),
    ("stt", 502, "Unable to complete the request. Please try again.", Transient, None),
    ("vfast", 503, "The service is temporarily unavailable. Please try again later.", Transient,
     None),
    ("vfast", 504, "The request timed out. Please try again.", Transient, None),
    ("svd", 504, "The request timed out. Please try again.", Transient, None),
    # Platform
    ("platform", 401, "Invalid credentials.", AuthError, None),
    ("platform", 404, "Job not found.", BadInput, None),
    ("platform", 409, "Job is already finalized.", BadInput, None),
    ("platform", 413, "File exceeds the 5 MB limit.", BadInput, None),
    ("platform", 429, "Concurrent request limit exceeded.", ConcurrencyLimited, False),
    ("platform", 403, "Monthly usage limit reached.", MonthlyLimitReached, None),
    (
        "platform",
        422,
        [{"loc": ["header", "apikey"], "msg": "Field required", "type": "missing"}],
        AuthError,
        None,
    ),
    # no detail at all
    ("stt", 401, None, AuthError, None),
    ("stt", 403, None, ConcurrencyLimited, True),
    ("svd", 403, None, ConcurrencyLimited, True),
    ("stt", 429, None, ConcurrencyLimited, True),
    ("stt", 400, None, BadInput, None),
    ("stt", 500, None, Transient, None),
    # documented defaults for unmatched statuses
    ("stt", 418, "I'm a teapot", BadInput, None),
    ("stt", 451, None, BadInput, None),
    ("stt", 599, None, Transient, None),
    ("stt", 302, None, Transient, None),
    ("stt", 408, None, Transient, None),
]


@pytest.mark.parametrize(("endpoint", "status", "detail", "cls", "suspect"), HTTP_CASES)
def test_http(
    endpoint: str, status: int, detail: object, cls: type[ModulateError], suspect: bool | None
) -> None:
    error = classify(endpoint=endpoint, status=status, detail=detail)
    assert type(error) is cls
    assert error.endpoint == endpoint and error.status == status
    if suspect is not None:
        assert isinstance(error, ConcurrencyLimited) and error.quota_suspect is suspect


# (endpoint, close code, reason, expected class, quota_suspect or None)
CLOSE_CASES: list[tuple[str, int, str, type[ModulateError], bool | None]] = [
    # legacy
    *[(e, 4001, "Invalid API key", AuthError, None) for e in ("stt-streaming", "pii-streaming")],
    (
        "stt-streaming", 4003, "Model access not enabled for this organization.",
        ModelNotEnabled, None,
    ),
    ("stt-streaming", 4029, "Monthly usage limit reached.", MonthlyLimitReached, None),
    ("stt-streaming", 4029, "Concurrent connection limit exceeded.", ConcurrencyLimited, False),
    ("pii-streaming", 4029, "Monthly usage limit reached.", MonthlyLimitReached, None),
    ("svd-streaming", 4003, "Invalid API key", AuthError, None),
    ("svd-streaming", 4003, "Monthly usage limit reached.", MonthlyLimitReached, None),
    ("svd-streaming", 4003, "Concurrent connection limit exceeded.", ConcurrencyLimited, False),
    (
        "svd-streaming", 4003, "Model access not enabled for this organization.",
        ModelNotEnabled, None,
    ),
    # 2026
    # "Model access not enabled, or usage denied" (the vendor's page): weighed by the gate.
    *[
        (e, 4003, NOT_PERMITTED, ConcurrencyLimited, True)
        for e in ("stt-streaming", "pii-streaming", "svd-streaming")
    ],
    ("stt-streaming", 4003, "Unable to validate request. Please try again.",
     ConcurrencyLimited, True),
    ("svd-streaming", 4003, "", ConcurrencyLimited, True),
    *[
        (e, 4029, CREDITS, ConcurrencyLimited, True)
        for e in ("stt-streaming", "pii-streaming", "svd-streaming")
    ],
    ("stt-streaming", 4029, "", ConcurrencyLimited, True),
    ("stt-streaming", 4003, "", ConcurrencyLimited, True),
    # bad params / audio
    ("stt-streaming", 1003, "Invalid audio_format='mp4'. Valid values: [...]", BadInput, None),
    ("svd-streaming", 1003, "audio_format query parameter is required.", BadInput, None),
    ("stt-streaming", 1003, "", BadInput, None),
    ("svd-streaming", 4002, "Audio data does not match the declared audio_format.", BadInput, None),
    # transient
    ("stt-streaming", 1011, "Internal server error", Transient, None),
    ("svd-streaming", 1011, "", Transient, None),
    ("stt-streaming", 1001, "", Transient, None),
    ("stt-streaming", 1000, "", Transient, None),  # a normal close before `done`
    # unmatched close codes: Transient, unless the reason says more
    ("stt-streaming", 4999, "", Transient, None),
    ("stt-streaming", 4999, "Invalid input audio", BadInput, None),
]


@pytest.mark.parametrize(("endpoint", "code", "reason", "cls", "suspect"), CLOSE_CASES)
def test_close_code(
    endpoint: str, code: int, reason: str, cls: type[ModulateError], suspect: bool | None
) -> None:
    error = classify(endpoint=endpoint, close_code=code, detail=reason or None)
    assert type(error) is cls
    assert error.close_code == code and error.status is None
    if suspect is not None:
        assert isinstance(error, ConcurrencyLimited) and error.quota_suspect is suspect


def _closed(code: int, reason: str) -> websockets.exceptions.ConnectionClosedError:
    frame = websockets.frames.Close(code, reason)
    return websockets.exceptions.ConnectionClosedError(frame, frame, True)


def test_connection_closed_reads_rcvd() -> None:
    error = classify(endpoint="stt-streaming", exc=_closed(4029, "Monthly usage limit reached."))
    assert type(error) is MonthlyLimitReached and error.close_code == 4029


def test_connection_closed_combines_error_message_and_reason() -> None:
    exc = _closed(4003, "")
    error = classify(endpoint="svd-streaming", exc=exc, detail="Monthly usage limit reached.")
    assert type(error) is MonthlyLimitReached


def test_abnormal_closure_is_transient() -> None:
    exc = websockets.exceptions.ConnectionClosedError(None, None)
    assert type(classify(endpoint="stt-streaming", exc=exc)) is Transient


def _invalid_status(status: int, body: bytes = b"") -> websockets.exceptions.InvalidStatus:
    headers = websockets.datastructures.Headers({"Retry-After": "2"})
    response = websockets.http11.Response(status, "x", headers, body)
    return websockets.exceptions.InvalidStatus(response)


@pytest.mark.parametrize(
    ("endpoint", "status", "body", "cls"),
    [
        ("stt-streaming", 401, b"", AuthError),
        ("stt-streaming", 403, b"", ConcurrencyLimited),
        ("svd-streaming", 403, b"", ConcurrencyLimited),
        ("stt-streaming", 403, b'{"detail": "Monthly usage limit reached."}', MonthlyLimitReached),
        (
            "stt-streaming", 429, b'{"detail": "Concurrent request limit exceeded."}',
            ConcurrencyLimited,
        ),
        ("stt-streaming", 500, b"<html>oops</html>", Transient),
    ],
)
def test_refused_handshake_is_classified_by_status(
    endpoint: str, status: int, body: bytes, cls: type[ModulateError]
) -> None:
    error = classify(endpoint=endpoint, exc=_invalid_status(status, body))
    assert type(error) is cls and error.status == status
    assert error.retry_after == 2.0
    assert "html" not in str(error)  # a non-JSON body never becomes the detail


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.PoolTimeout("timed out"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        websockets.exceptions.InvalidHandshake("bad"),
        RuntimeError("anything unforeseen"),
    ],
)
def test_transport_exceptions_are_transient(exc: BaseException) -> None:
    assert type(classify(endpoint="stt", exc=exc)) is Transient


def test_no_signal_is_transient() -> None:
    assert type(classify(endpoint="stt")) is Transient


@pytest.mark.parametrize(
    ("detail", "cls"),
    [
        ("Invalid API key", AuthError),
        ("Monthly usage limit reached.", MonthlyLimitReached),
        ("Concurrent connection limit exceeded.", ConcurrencyLimited),
        (CREDITS, ConcurrencyLimited),
        ("Invalid input audio", BadInput),
        ("Raw audio formats require sample_rate and num_channels query parameters", BadInput),
        ("Internal server error", Transient),
        ("Unable to validate request. Please try again.", Transient),
    ],
)
def test_stream_error_message_alone(detail: str, cls: type[ModulateError]) -> None:
    assert type(classify(endpoint="stt-streaming", detail=detail)) is cls


@pytest.mark.parametrize(
    ("endpoint", "status", "close_code", "access"),
    [("svd", 403, None, True), ("svd-streaming", None, 4003, True), ("stt", 429, None, False),
     ("stt-streaming", None, 4029, False)],
)
def test_access_suspect_only_where_a_bad_key_answers_alike(
    endpoint: str, status: int | None, close_code: int | None, access: bool
) -> None:
    detail = "This request is not permitted." if access else CREDITS
    error = classify(endpoint=endpoint, status=status, close_code=close_code, detail=detail)
    assert isinstance(error, ConcurrencyLimited) and error.quota_suspect
    assert error.access_suspect is access


def test_retry_after_seconds_and_date() -> None:
    error = classify(endpoint="stt", status=429, detail="Concurrent", headers={"Retry-After": "1"})
    assert error.retry_after == 1.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    error = classify(endpoint="stt", status=429, headers=httpx.Headers({"retry-after": when}))
    assert error.retry_after is not None and 25 <= error.retry_after <= 31
    assert classify(endpoint="stt", status=429, headers={"Retry-After": "soon"}).retry_after is None


def test_list_detail_is_log_safe_text() -> None:
    error = classify(endpoint="pii", status=422, detail=MISSING_KEY_2026)
    assert error.detail == "header.X-API-Key: Field required"


def test_detail_is_truncated_and_redacted() -> None:
    detail = "failed for wss://h/api?api_key=sekrit-key&x=1 " + "x" * 1000
    error = classify(endpoint="stt-streaming", close_code=1011, detail=detail)
    assert "sekrit-key" not in str(error) and "sekrit-key" not in (error.detail or "")
    assert len(error.detail or "") <= 300


def test_classify_is_pure() -> None:
    headers = {"Retry-After": "1"}
    detail = list(MISSING_KEY_2026)
    first = classify(endpoint="stt", status=422, detail=detail, headers=headers)
    second = classify(endpoint="stt", status=422, detail=detail, headers=headers)
    assert detail == MISSING_KEY_2026 and headers == {"Retry-After": "1"}
    assert type(first) is type(second) and str(first) == str(second)
    assert first is not second


def test_hierarchy_and_context() -> None:
    assert issubclass(ModelNotEnabled, AuthError)
    for cls in (ConcurrencyLimited, MonthlyLimitReached, AuthError, BadInput, Transient):
        assert issubclass(cls, ModulateError) and not issubclass(cls, ValueError)
    error = classify(endpoint="svd", status=403, detail=NOT_PERMITTED)
    assert str(error).startswith("svd: HTTP 403: This request is not permitted.")


def test_errors_pickle_with_context() -> None:
    error = classify(endpoint="svd", status=403, detail=NOT_PERMITTED, headers={"Retry-After": "3"})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ConcurrencyLimited and copy.quota_suspect is True
    assert (copy.endpoint, copy.status, copy.detail, copy.retry_after) == (
        "svd", 403, NOT_PERMITTED, 3.0,
    )
    assert str(copy) == str(error)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("wss://h/api/x?api_key=K&audio_format=wav", "wss://h/api/x?api_key=***&audio_format=wav"),
        ("https://h/rt?token=T", "https://h/rt?token=***"),
        ("https://h/rt?apikey=T&a=1", "https://h/rt?apikey=***&a=1"),
        ("https://h/rt?API_KEY=T", "https://h/rt?API_KEY=***"),
        ("https://h/path", "https://h/path"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
