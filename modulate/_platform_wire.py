"""Wire names of the Modulate Platform API as settings (API_CONTRACT.md §9: mostly unknown).

Only `audio_base64`, `file_extension`, `flags{emotion_annotation, demographics}`, `filename`,
`job_id` and `status` ("processing" → "completed") are documented. `submission_type` and its
values, `finalize_job`, the two other flags and the whole job-status schema are our reading
of the auth page, so each is a field of `PlatformWire` (the Platform Credentials block's `wire`
group), today's reading the default. Where a response field is unknown the setting is a list
of candidate names, tried in order, so both flat and nested shapes parse without a change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_WIRE", "PlatformWire"]

_Names = tuple[str, ...]


class PlatformWire(BaseModel):
    """Field names and values of the Platform API's request and job-status bodies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    submit_path: str = Field("/api_service", description="Path of the submission POST.")
    job_status_path: str = Field(
        "/api_service/job_status/{job_id}", description="Path of the job-status GET."
    )
    account_header: str = Field("accountuuid", description="Header carrying the account UUID.")
    key_header: str = Field("apikey", description="Header carrying the API key.")
    audio_field: str = Field("audio_base64", description="Body field of the base64 audio.")
    extension_field: str = Field("file_extension", description="Body field of the extension.")
    filename_field: str = Field("filename", description="Body field of the file name.")
    flags_field: str = Field("flags", description="Body object holding the analysis flags.")
    flag_names: dict[str, str] = Field(
        default_factory=lambda: {
            "emotion_annotation": "emotion_annotation",
            "demographics": "demographics",
            "synthetic_voice_detection": "synthetic_voice_detection",
            "behavioral_insights": "behavioral_insights",
        },
        description="Wire name of each analysis flag (our name: the service's name).",
    )
    submission_type_field: str | None = Field(
        "submission_type",
        description="Body field naming the kind of submission; empty to send none.",
    )
    single_file_type: str = Field("single_file", description="submission_type of one file.")
    multi_file_type: str = Field("multi_file", description="submission_type of a multi-file job.")
    realtime_type: str = Field(
        "realtime_websocket", description="submission_type of a realtime session."
    )
    job_id_field: str = Field("job_id", description="Field of the job id, in requests and answers.")
    finalize_field: str = Field(
        "finalize_job", description="Body field (boolean) that closes a multi-file job."
    )

    status_field: str = Field("status", description="Job-status field holding the job's status.")
    completed_statuses: _Names = Field(
        ("completed", "complete", "done", "succeeded", "success", "finished"),
        description="Status values of a job (or file) that finished well (case-insensitive, as "
        "running_statuses).",
    )
    failed_statuses: _Names = Field(
        ("failed", "failure", "error", "errored", "cancelled", "canceled"),
        description="Status values of a job (or file) that failed (case-insensitive, as "
        "running_statuses).",
    )
    running_statuses: _Names = Field(
        ("processing", "accepting_files", "queued", "pending", "running", "in_progress",
         "submitted", "started", "received", "accepted", "uploading", "uploaded",
         "transcribing", "analyzing", "analysing", "finalizing", "finalising", "waiting"),
        description="Status values of a job still being worked on (case-insensitive; spaces "
        "and hyphens read as underscores).",
    )
    files_fields: _Names = Field(
        ("files", "results"), description="Candidate job-status fields listing the files."
    )
    file_id_fields: _Names = Field(
        ("file_id", "id"), description="Candidate per-file fields of the service's file id."
    )
    result_fields: _Names = Field(
        ("result", "output"),
        description="Candidate per-file fields nesting the result; absent means flat.",
    )
    transcript_fields: _Names = Field(
        ("transcript", "text"),
        description="Candidate result fields of the transcript (a string or {text: ...}).",
    )
    error_fields: _Names = Field(
        ("error", "error_message", "message", "detail"),
        description="Candidate fields of an error text, per job and per file.",
    )

    def setting_for(self, text: str) -> str | None:
        """The setting whose wire name appears in a service's error text, if any."""
        lowered = text.lower()
        for name, value in self.model_dump().items():
            if isinstance(value, str) and len(value) > 3 and value.lower() in lowered:
                return name
        return None


DEFAULT_WIRE = PlatformWire()
