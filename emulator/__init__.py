"""A local Modulate-compatible server (Velma-2 batch + WebSocket APIs and the Platform API).

For tests, the demo and the benchmark: limits, latency, faults and both families of error
details, with transcripts that are a deterministic function of the audio bytes.
"""

from __future__ import annotations

from emulator.app import create_app
from emulator.audio import make_wav
from emulator.config import EmulatorConfig, Faults, Latency, ModelLimits, OrgConfig
from emulator.server import RunningEmulator, run_in_thread, serve
from emulator.state import EmulatorState

__all__ = [
    "EmulatorConfig",
    "EmulatorState",
    "Faults",
    "Latency",
    "ModelLimits",
    "OrgConfig",
    "RunningEmulator",
    "create_app",
    "make_wav",
    "run_in_thread",
    "serve",
]
