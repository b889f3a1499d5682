"""Prefect blocks: what a deployment keeps between runs.

Credentials, the org's limits, and where output goes.
"""

from __future__ import annotations

from blocks.credentials import ModulateCredentials, PlatformCredentials
from blocks.limits import ModelLimit, OrgLimits
from blocks.output import ParquetOutput

__all__ = ["ModelLimit", "ModulateCredentials", "OrgLimits", "ParquetOutput", "PlatformCredentials"]
