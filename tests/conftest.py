"""Shared pytest setup for the mpu-bridge test suite.

Hypothesis runs without a per-example deadline: the machines running the suite
are shared and slow, and a deadline would make tests flaky, not stricter. Each
property test bounds its own ``max_examples``.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("mpu-bridge", deadline=None)
settings.load_profile("mpu-bridge")
