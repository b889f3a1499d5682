"""The organisation's limits per model, declared once and synced into Prefect concurrency limits."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from pydantic import BaseModel, Field

from tasks.slots import limit_name

__all__ = ["ModelLimit", "OrgLimits"]

DEFAULT_BILLING_PERIOD_START_DAY = 1
DEFAULT_BUDGET_MARGIN = 0.02


class ModelLimit(BaseModel):
    """One model's limits for the organisation, as Modulate set them."""

    concurrent: int = Field(
        default=5,
        ge=1,
        title="Concurrent",
        description="Requests or streams that may be in flight at once.",
    )
    monthly_audio_hours: float = Field(
        default=1000.0,
        gt=0,
        title="Monthly audio hours",
        description="Audio hours the organisation may process per month.",
    )


class OrgLimits(Block):
    """An organisation's per-model limits on Modulate's APIs.

    `sync()` writes them into Prefect global concurrency limits named
    `modulate:<organization>:<model>`, which every run on every worker holds. Runs spend
    each model's monthly audio hours within the billing period, less the safety margin.

    Example:
        ```python
        from blocks import OrgLimits

        limits = OrgLimits.load("BLOCK_NAME")
        await limits.sync()
        ```
    """

    _block_type_name = "Modulate Org Limits"
    _block_type_slug = "modulate-org-limits"
    _documentation_url = "https://docs.modulate.ai/guides/authentication"

    organization: str = Field(
        default=...,
        title="Organization",
        description="A short name for the organisation; it names the Prefect limits.",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    models: dict[str, ModelLimit] = Field(
        default_factory=dict,
        title="Limits per model",
        description=(
            "Limits per model: stt, vfast, svd, pii, stt-streaming, svd-streaming, "
            "pii-streaming, platform. A model left out gets the default limits."
        ),
    )

    billing_period_start_day: int = Field(
        default=DEFAULT_BILLING_PERIOD_START_DAY,
        ge=1,
        le=28,
        title="Billing period start day",
        description=(
            "Day of the month (UTC) the monthly audio hours reset on; 1 means calendar months."
        ),
    )
    budget_margin: float = Field(
        default=DEFAULT_BUDGET_MARGIN,
        ge=0,
        lt=1,
        title="Budget safety margin",
        description=(
            "Share of each model's monthly audio hours runs leave unspent, for estimates that "
            "run short and for other clients of the organisation (0.02 = 2%)."
        ),
    )

    def for_model(self, model: str) -> ModelLimit:
        """The limits of one model (the defaults where none were declared)."""
        return self.models.get(model, ModelLimit())

    def limit_name(self, model: str) -> str:
        """The Prefect concurrency limit that holds this model's concurrent limit."""
        return limit_name(self.organization, model)

    async def sync(self) -> dict[str, int]:
        """Create or update one Prefect concurrency limit per declared model."""
        synced: dict[str, int] = {}
        async with get_client() as client:
            for model, limit in sorted(self.models.items()):
                name = self.limit_name(model)
                await client.upsert_global_concurrency_limit_by_name(name, limit.concurrent)
                synced[name] = limit.concurrent
        return synced
