"""Credentials blocks for the two Modulate API surfaces, each the factory of its client."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from modulate import BatchClient, PlatformClient, PlatformWire, StreamingClient
from modulate._constants import DEFAULT_MODELS_BASE_URL, DEFAULT_PLATFORM_BASE_URL

__all__ = ["ModulateCredentials", "PlatformCredentials"]


class ModulateCredentials(Block):
    """An API key for Modulate's Velma-2 model APIs (batch and streaming).

    Example:
        ```python
        from blocks import ModulateCredentials

        credentials = ModulateCredentials.load("BLOCK_NAME")
        async with credentials.batch_client() as client:
            transcript = await client.transcribe(audio, "call.wav")
        ```
    """

    _block_type_name = "Modulate Credentials"
    _block_type_slug = "modulate-credentials"
    _documentation_url = "https://docs.modulate.ai/guides/authentication"

    api_key: SecretStr = Field(
        default=..., title="API key", description="The Velma-2 API key (X-API-Key)."
    )
    base_url: str = Field(
        default=DEFAULT_MODELS_BASE_URL,
        title="Base URL",
        description="Base URL of the Velma-2 APIs; the WebSocket URL is derived from it.",
    )

    def batch_client(self) -> BatchClient:
        """A client for the batch endpoints, built with this block's key."""
        return BatchClient(api_key=self.api_key, base_url=self.base_url)

    def streaming_client(self) -> StreamingClient:
        """A client for the WebSocket streaming endpoints, built with this block's key."""
        return StreamingClient(api_key=self.api_key, base_url=self.base_url)


class PlatformCredentials(Block):
    """An account UUID and API key for the Modulate Platform API (asynchronous jobs).

    The `wire` group holds the field names and values the vendor does not publish
    (submission_type and its values, finalize_job, the job-status fields); change them there
    when the service answers otherwise (docs/platform.md, Wire settings).

    Example:
        ```python
        from blocks import PlatformCredentials

        credentials = PlatformCredentials.load("BLOCK_NAME")
        async with credentials.platform_client() as client:
            status = await client.job_status(job_id)
        ```
    """

    _block_type_name = "Modulate Platform Credentials"
    _block_type_slug = "modulate-platform-credentials"
    _documentation_url = "https://docs.modulate.ai/guides/authentication"

    account_uuid: str = Field(
        default=..., title="Account UUID", description="The Platform account UUID (accountuuid)."
    )
    api_key: SecretStr = Field(
        default=..., title="API key", description="The Platform API key (apikey)."
    )
    base_url: str = Field(
        default=DEFAULT_PLATFORM_BASE_URL,
        title="Base URL",
        description="Base URL of the Modulate Platform API.",
    )
    wire: PlatformWire = Field(
        default_factory=PlatformWire,
        title="Wire settings",
        description="Request and job-status field names the vendor does not publish.",
    )

    def platform_client(self) -> PlatformClient:
        """A Platform API client built with this block's account, key and wire settings."""
        return PlatformClient(
            account_uuid=self.account_uuid,
            api_key=self.api_key,
            base_url=self.base_url,
            wire=self.wire,
        )
