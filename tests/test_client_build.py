"""The pure request builders and local pre-checks: no server, no network."""

from __future__ import annotations

import base64
import json
import struct
from email import message_from_bytes
from email.message import Message

import httpx
import pytest
from pydantic import SecretStr

import modulate
from modulate import (
    BadInput,
    CustomTerm,
    MonthlyLimitReached,
    PlatformFlags,
    PlatformWire,
    RedactionOptions,
    STTOptions,
)
from modulate._http import _error_detail
from modulate._platform_parse import parse_job_status
from modulate.batch import (
    _build_pii,
    _build_stt,
    _build_svd,
    _build_vfast,
    _decode_multipart,
    wav_duration_ms,
)
from modulate.errors import classify
from modulate.models import RealtimeSession, RedactionMetadata, Utterance
from modulate.platform import _build_job_status, _build_realtime, _build_submit
from modulate.streaming import StreamingClient, StreamParams

BASE = "https://modulate-developer-apis.com"
KEY = SecretStr("test-key-123")


def wav(ms: int, rate: int = 16000) -> bytes:
    samples = rate * ms // 1000
    data = b"\0\0" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
        + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )


def parts(request: httpx.Request) -> dict[str, Message]:
    body = request.read()
    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + body
    message = message_from_bytes(raw)
    return {p.get_param("name", header="content-disposition"): p for p in message.get_payload()}


def fields(request: httpx.Request) -> dict[str, str]:
    return {
        name: part.get_payload()
        for name, part in parts(request).items()
        if name != "upload_file"
    }


@pytest.mark.parametrize(
    ("filename", "mime"),
    [("a.wav", "audio/wav"), ("b.MP3", "audio/mpeg"), ("c.opus", "audio/opus"),
     ("d.mp4", "video/mp4"), ("e.mov", "video/quicktime"), ("f.webm", "video/webm"),
     ("g.flac", "audio/flac"), ("h.ogg", "audio/ogg"), ("i.aac", "audio/aac"),
     ("j.aiff", "audio/aiff")],
)
def test_upload_file_part_has_real_name_and_mime(filename: str, mime: str) -> None:
    request = _build_vfast(BASE, KEY, b"audio-bytes", filename)
    upload = parts(request)["upload_file"]
    assert upload.get_param("filename", header="content-disposition") == filename
    assert upload.get_content_type() == mime
    assert upload.get_payload(decode=True) == b"audio-bytes"
    assert "octet-stream" not in request.read().decode("latin-1")


def test_stt_request() -> None:
    request = _build_stt(BASE, KEY, b"x", "call.wav", STTOptions(emotion_signal=True))
    assert request.method == "POST"
    assert str(request.url) == BASE + "/api/velma-2-stt-batch"
    assert request.headers["X-API-Key"] == "test-key-123"
    assert "api_key" not in str(request.url)
    assert fields(request) == {
        "speaker_diarization": "true",
        "emotion_signal": "true",
        "accent_signal": "false",
        "deepfake_signal": "false",
        "pii_phi_tagging": "false",
    }


def test_stt_language_and_custom_terms_only_when_set() -> None:
    options = STTOptions(
        language="fr",
        custom_terms=["Velma", CustomTerm(term="Modulate", pronunciations=["MOD-yoo-layt"])],
    )
    got = fields(_build_stt(BASE, KEY, b"x", "a.wav", options))
    assert got["language"] == "fr"
    assert json.loads(got["config"]) == {
        "custom_terms": ["Velma", {"term": "Modulate", "pronunciations": ["MOD-yoo-layt"]}]
    }


def test_vfast_and_svd_send_only_the_file() -> None:
    assert set(parts(_build_vfast(BASE, KEY, b"x", "a.mp3"))) == {"upload_file"}
    request = _build_svd(BASE, KEY, wav(1000), "a.wav")
    assert set(parts(request)) == {"upload_file"}
    assert request.url.path == "/api/velma-2-synthetic-voice-detection-batch"


def test_pii_request() -> None:
    request = _build_pii(BASE, KEY, b"x", "a.ogg", RedactionOptions(end_redaction_padding_ms=50))
    assert request.url.path == "/api/velma-2-pii-phi-redaction-batch"
    assert fields(request) == {
        "speaker_diarization": "true",
        "start_redaction_padding_ms": "100",
        "end_redaction_padding_ms": "50",
    }


def test_requests_are_resendable() -> None:
    request = _build_stt(BASE, KEY, b"x", "a.wav", STTOptions())
    assert request.read() == request.read()


@pytest.mark.parametrize(
    ("audio", "filename", "words"),
    [
        (b"", "a.wav", "empty"),
        (b"x" * (100 * 1024 * 1024 + 1), "a.wav", "100 MB"),
        (b"x", "a.txt", "unsupported extension"),
        (b"x", "noextension", "unsupported extension"),
        (b"x", "a.amr", "unsupported extension"),  # SVD only
    ],
)
def test_prechecks(audio: bytes, filename: str, words: str) -> None:
    with pytest.raises(BadInput, match=words) as info:
        _build_stt(BASE, KEY, audio, filename, STTOptions())
    assert info.value.endpoint == "stt" and info.value.status is None


def test_svd_accepts_its_extra_extensions() -> None:
    _build_svd(BASE, KEY, b"x", "a.amr")


def test_svd_too_short() -> None:
    with pytest.raises(BadInput, match="at least 500 ms"):
        _build_svd(BASE, KEY, wav(400), "a.wav")
    with pytest.raises(BadInput, match="at least 500 ms"):
        _build_svd(BASE, KEY, b"mp3-bytes", "a.mp3", duration_ms=100)
    _build_svd(BASE, KEY, wav(500), "a.wav")
    _build_svd(BASE, KEY, b"mp3-bytes", "a.mp3")  # unknown duration: the server decides


def test_misuse_is_value_error() -> None:
    with pytest.raises(ValueError):
        _build_stt(BASE, KEY, "text", "a.wav", STTOptions())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        modulate.BatchClient(api_key="plain")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        STTOptions(unknown=True)  # type: ignore[call-arg]


def test_wav_duration() -> None:
    assert wav_duration_ms(wav(1234)) == 1234
    assert wav_duration_ms(wav(2000, rate=8000)) == 2000
    assert wav_duration_ms(b"ID3 not a wav") is None
    assert wav_duration_ms(b"RIFF\0\0\0\0WAVE") is None
    truncated = wav(1000)[:-16000]  # header says 1 s, half the data present
    assert wav_duration_ms(truncated) == 500


def test_multipart_response_decoding() -> None:
    metadata = {"text": "t", "duration_ms": 10, "utterances": [], "redaction_ranges": [[1, 2]]}
    mp3 = bytes(range(256)) * 4 + b"\r\n--notboundary\r\n"
    request = httpx.Request(
        "POST", "http://x", files={"metadata": (None, json.dumps(metadata)), "audio": ("a", mp3)}
    )
    decoded = _decode_multipart(request.headers["content-type"], request.read())
    assert json.loads(decoded["metadata"]) == metadata
    assert decoded["audio"] == mp3


def test_models_are_tolerant() -> None:
    u = Utterance.model_validate({"text": "hi", "start_ms": 100, "end_ms": 300, "extra": 1})
    assert (u.duration_ms, u.end_ms, u.utterance_uuid) == (200, 300, None)
    u = Utterance.model_validate({"text": "hi", "start_ms": 100, "duration_ms": 50})
    assert u.end_ms == 150
    pairs = RedactionMetadata.model_validate({"redaction_ranges": [[1, 2]]})
    objects = RedactionMetadata.model_validate({"redaction_ranges": [{"start_ms": 1, "end_ms": 2}]})
    assert pairs.redaction_ranges == objects.redaction_ranges == [(1, 2)]


def test_utterance_timing_sent_as_strings_reads_as_numbers() -> None:
    """The spec says integers; a service that sends "2500" must not crash the run (a
    TypeError escaped) or glue the strings ("2500" + "2500")."""
    both = Utterance.model_validate({"start_ms": "2500", "duration_ms": "2500"})
    assert (both.start_ms, both.duration_ms, both.end_ms) == (2500, 2500, 5000)
    one = Utterance.model_validate({"start_ms": 0, "end_ms": "2000"})
    assert one.duration_ms == 2000


def test_realtime_session_hides_its_token() -> None:
    session = RealtimeSession(job_id="j", realtime_url="wss://h/rt/j?token=SECRET-TOKEN")
    assert "SECRET-TOKEN" not in repr(session) and "SECRET-TOKEN" not in str(session)
    assert session.realtime_url.endswith("SECRET-TOKEN")


# --- Platform ----------------------------------------------------------------------------------

HEADERS = {"accountuuid": "acc", "apikey": "platform-key"}
PBASE = "https://cloud-processing-api.modulate.ai"
WIRE = PlatformWire()


def test_platform_single_file() -> None:
    request = _build_submit(PBASE, WIRE, HEADERS, b"abc", "dir/a.wav", PlatformFlags(), None, True)
    assert str(request.url) == PBASE + "/api_service"
    assert request.headers["accountuuid"] == "acc" and request.headers["apikey"] == "platform-key"
    assert json.loads(request.read()) == {
        "audio_base64": base64.b64encode(b"abc").decode(),
        "file_extension": "wav",
        "filename": "a.wav",
        "flags": {},
        "submission_type": "single_file",
    }


def test_platform_multi_file_and_flags() -> None:
    flags = PlatformFlags(emotion_annotation=True, synthetic_voice_detection=True)
    first = json.loads(
        _build_submit(PBASE, WIRE, HEADERS, b"a", "a.mp3", flags, None, False).read()
    )
    assert first["submission_type"] == "multi_file" and first["finalize_job"] is False
    assert "job_id" not in first
    assert first["flags"] == {"emotion_annotation": True, "synthetic_voice_detection": True}
    last = json.loads(
        _build_submit(PBASE, WIRE, HEADERS, b"a", "b.opus", flags, "job-1", True).read()
    )
    assert last["submission_type"] == "multi_file"
    assert (last["job_id"], last["finalize_job"], last["file_extension"]) == ("job-1", True, "opus")


def test_platform_realtime_and_status() -> None:
    request = _build_realtime(PBASE, WIRE, HEADERS, PlatformFlags(demographics=True))
    body = json.loads(request.read())
    assert body == {"flags": {"demographics": True}, "submission_type": "realtime_websocket"}
    request = _build_job_status(PBASE, WIRE, HEADERS, "abc/../x")
    assert request.method == "GET"
    assert request.url.raw_path == b"/api_service/job_status/abc%2F..%2Fx"


@pytest.mark.parametrize(
    ("audio", "filename", "words"),
    [
        (b"x" * (5 * 1024 * 1024 + 1), "a.wav", "5 MB"),
        (b"x", "a.flac", "unsupported extension"),
        (b"", "a.wav", "empty"),
    ],
)
def test_platform_prechecks(audio: bytes, filename: str, words: str) -> None:
    with pytest.raises(BadInput, match=words) as info:
        _build_submit(PBASE, WIRE, HEADERS, audio, filename, PlatformFlags(), None, True)
    assert info.value.endpoint == "platform"


def test_platform_wire_settings_change_the_body() -> None:
    wire = PlatformWire(submission_type_field=None, finalize_field="finalize",
                        flag_names={"demographics": "speaker_demographics"})
    body = json.loads(_build_submit(PBASE, wire, HEADERS, b"a", "a.wav",
                                    PlatformFlags(demographics=True), "job-1", True).read())
    assert "submission_type" not in body and body["finalize"] is True
    assert body["flags"] == {"speaker_demographics": True}


NESTED = {"job_id": "j", "status": "completed", "files": [
    {"file_id": "f1", "filename": "a.wav", "status": "completed",
     "result": {"transcript": {"text": "hello"}, "emotion": []}},
    {"file_id": "f2", "filename": "b.wav", "status": "failed", "error": "bad audio"},
]}
FLAT = {"job_id": "j", "status": "DONE", "results": [
    {"id": 7, "filename": "a.wav", "transcript": "hello", "emotion": []},
]}


def test_job_status_nested_and_flat_shapes_read_alike() -> None:
    nested, flat = parse_job_status(NESTED, WIRE), parse_job_status(FLAT, WIRE)
    assert nested.outcome == flat.outcome == "completed"
    assert nested.files[0].transcript_text == flat.files[0].transcript_text == "hello"
    assert nested.files[0].result == {"transcript": {"text": "hello"}, "emotion": []}
    assert flat.files[0].result == {"transcript": "hello", "emotion": []}
    assert flat.files[0].file_id == "7" and flat.files[0].outcome is None  # the job's stands
    assert (nested.files[1].outcome, nested.files[1].error) == ("failed", "bad audio")
    assert nested.raw is NESTED
    single = parse_job_status({"status": "completed", "transcript": "hi"}, WIRE)
    assert [f.transcript_text for f in single.files] == ["hi"]


@pytest.mark.parametrize("envelope", ["detail", "error", "message"])
def test_an_error_text_is_read_from_whichever_usual_field_holds_it(envelope: str) -> None:
    """The Platform API's error envelope is unknown (API_CONTRACT.md 9.2): a monthly limit
    said under "error" or "message" must not read as a bare 403."""
    response = httpx.Response(403, json={envelope: "Monthly usage limit reached."})
    error = classify(endpoint="platform", status=403, detail=_error_detail(response))
    assert type(error) is MonthlyLimitReached


@pytest.mark.parametrize(
    "status", ["In Progress", "in-progress", "transcribing", "Received", "uploading", "finalizing"]
)
def test_a_job_still_being_worked_on_reads_as_running_however_it_is_spelled(status: str) -> None:
    """The status values past "processing" and "completed" are unknown (API_CONTRACT.md 9.2):
    three unreadable answers in a row leave the job to a rerun, so a live job must not read
    as unreadable for a spelling."""
    assert parse_job_status({"status": status}, WIRE).outcome == "running"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (["not", "an", "object"], "expected a JSON object"),
        ({"state": "done"}, "wire.status_field"),
        ({"status": "weird"}, "wire.completed_statuses"),
        ({"status": "completed", "files": "x"}, "wire.files_fields"),
    ],
)
def test_an_unreadable_job_status_names_what_was_expected(body: object, words: str) -> None:
    status = parse_job_status(body, WIRE)
    assert status.outcome == "unreadable" and words in (status.problem or "")


# --- streaming URL -----------------------------------------------------------------------------


def test_streaming_urls() -> None:
    client = StreamingClient(api_key=KEY, base_url="https://h.example/")
    url = client.url("svd", StreamParams(audio_format="s16le", sample_rate=16000, num_channels=1))
    assert url.startswith("wss://h.example/api/velma-2-synthetic-voice-detection-streaming?")
    assert "audio_format=s16le" in url and "sample_rate=16000" in url
    assert "speaker_diarization" not in url
    stt = StreamingClient(api_key=KEY, base_url="http://127.0.0.1:9").url(
        "stt", StreamParams(partial_results=True, language="en")
    )
    assert stt.startswith("ws://127.0.0.1:9/api/velma-2-stt-streaming?api_key=test-key-123")
    assert "partial_results=true" in stt and "emotion_signal=false" in stt and "language=en" in stt
    assert "audio_format" not in stt
    pii = client.url("pii", StreamParams(audio_format="opus"))
    assert "audio_format=ogg" in pii and "start_redaction_padding_ms=100" in pii


@pytest.mark.parametrize(
    ("endpoint", "params"),
    [
        ("svd", StreamParams()),
        ("stt", StreamParams(audio_format="s16le")),
        ("stt", StreamParams(audio_format="wav", sample_rate=16000, num_channels=1)),
        ("stt", StreamParams(sample_rate=16000, num_channels=1)),
        ("stt", StreamParams(audio_format="s16le", sample_rate=12345, num_channels=1)),
    ],
)
def test_streaming_param_misuse(endpoint: str, params: StreamParams) -> None:
    with pytest.raises(ValueError):
        StreamingClient(api_key=KEY).url(endpoint, params)  # type: ignore[arg-type]


def test_exports_are_complete_and_sorted() -> None:
    import modulate.batch
    import modulate.errors
    import modulate.gate
    import modulate.limits
    import modulate.models
    import modulate.platform
    import modulate.streaming

    expected: set[str] = set()
    for module in (
        modulate.batch, modulate.errors, modulate.gate, modulate.limits, modulate.models,
        modulate.platform, modulate.streaming,
    ):
        expected |= set(module.__all__)
    assert set(modulate.__all__) == expected
    assert all(hasattr(modulate, name) for name in modulate.__all__)
    # isort-style: CONSTANTS, then Classes, then functions
    kind = {True: 0, False: 1}
    order = sorted(modulate.__all__, key=lambda n: (kind[n.isupper()], n[0].islower(), n))
    assert modulate.__all__ == order
