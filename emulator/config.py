"""Configuration of the emulator: organisations, keys, per-model limits, latency and faults.

Plain pydantic models, loadable from a JSON (or YAML) file. The state object keeps the live
copy; admin routes and in-process tests change it at runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BATCH_MODELS",
    "DEFAULT_ACCOUNT_UUID",
    "DEFAULT_PLATFORM_KEY",
    "DEFAULT_VELMA_KEY",
    "MODELS",
    "STREAMING_MODELS",
    "DetailFamily",
    "EmulatorConfig",
    "Faults",
    "Latency",
    "ModelLimits",
    "OrgConfig",
    "PlatformWireVariant",
]

DetailFamily = Literal["legacy", "2026"]
# Two readings of the unpublished Platform wire (emulator/platform.py): "nested" (per-file
# status, results under `result`, transcript an object) and "flat" (other submission_type
# values, `finalize`, flat results without per-file status, transcript a string).
PlatformWireVariant = Literal["nested", "flat"]

BATCH_MODELS: tuple[str, ...] = ("stt", "vfast", "svd", "pii")
STREAMING_MODELS: tuple[str, ...] = ("stt-streaming", "svd-streaming", "pii-streaming")
MODELS: tuple[str, ...] = (*BATCH_MODELS, *STREAMING_MODELS, "platform")

DEFAULT_ORG = "demo"
DEFAULT_VELMA_KEY = "demo-velma-key"
DEFAULT_ACCOUNT_UUID = "00000000-0000-4000-8000-000000000000"
DEFAULT_PLATFORM_KEY = "demo-platform-key"
DEFAULT_CONCURRENT = 5
DEFAULT_MONTHLY_AUDIO_HOURS = 1000.0
DEFAULT_SLOW_S = 30.0
DEFAULT_PLATFORM_JOB_SECONDS = 1.0


class ModelLimits(BaseModel):
    """Limits of one model for one organisation."""

    model_config = ConfigDict(validate_assignment=True)

    enabled: bool = True
    concurrent: int = Field(default=DEFAULT_CONCURRENT, ge=0)
    monthly_audio_hours: float = Field(default=DEFAULT_MONTHLY_AUDIO_HOURS, ge=0)


class OrgConfig(BaseModel):
    """One organisation: its Velma-2 keys, its Platform credentials and its model limits."""

    name: str
    velma_keys: list[str] = Field(default_factory=list)
    platform_account_uuid: str | None = None
    platform_api_key: str | None = None
    models: dict[str, ModelLimits] = Field(
        default_factory=dict,
        description="Limits by model key; a model missing here gets default ModelLimits.",
    )

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: dict[str, ModelLimits]) -> dict[str, ModelLimits]:
        unknown = sorted(set(value) - set(MODELS))
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; expected some of {list(MODELS)}")
        return value

    def limits(self, model: str) -> ModelLimits:
        """The limits of `model`, created with defaults on first use so they can be patched."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}")
        return self.models.setdefault(model, ModelLimits())


class Latency(BaseModel):
    """Each accepted batch call holds its slot for
    max(0, mean_s + U(-jitter_s, jitter_s)) + per_audio_s * its audio's seconds."""

    mean_s: float = Field(default=0.0, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    per_audio_s: float = Field(
        default=0.0, ge=0, description="Seconds of latency added per second of audio."
    )


class Faults(BaseModel):
    """Per accepted request probabilities of a 5xx, a dropped connection, a slow answer, or a
    garbled one: the work is done and billed, but the 200's body is not JSON."""

    error_5xx_rate: float = Field(default=0.0, ge=0, le=1)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_s: float = Field(default=DEFAULT_SLOW_S, ge=0)
    garbled_rate: float = Field(default=0.0, ge=0, le=1)


class EmulatorConfig(BaseModel):
    """Everything the emulator needs; `create_app(config)` takes one of these."""

    orgs: list[OrgConfig]
    latency: Latency = Field(default_factory=Latency)
    faults: Faults = Field(default_factory=Faults)
    detail_family: DetailFamily = "2026"
    platform_job_seconds: float = Field(default=DEFAULT_PLATFORM_JOB_SECONDS, ge=0)
    wav_duration_from_header: bool = Field(
        default=False,
        description="A batch WAV lasts what its data chunk's size declares, even when the "
        "body is shorter: benchmarks send hour-long calls as files of a few KB.",
    )
    platform_wire: PlatformWireVariant = "nested"
    seed: int = 0

    @classmethod
    def default(cls) -> EmulatorConfig:
        """One org "demo" with the demo keys and every model enabled at the default limits."""
        return cls(
            orgs=[
                OrgConfig(
                    name=DEFAULT_ORG,
                    velma_keys=[DEFAULT_VELMA_KEY],
                    platform_account_uuid=DEFAULT_ACCOUNT_UUID,
                    platform_api_key=DEFAULT_PLATFORM_KEY,
                    models={model: ModelLimits() for model in MODELS},
                )
            ]
        )

    @classmethod
    def load(cls, path: str | Path) -> EmulatorConfig:
        """Read a config from a JSON file (or YAML when the name ends in .yaml/.yml)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        data: Any
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # type: ignore[import-untyped]  # optional: YAML configs only

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.model_validate(data)

    def org(self, name: str) -> OrgConfig:
        """The org called `name`; KeyError if there is none."""
        for org in self.orgs:
            if org.name == name:
                return org
        raise KeyError(name)
