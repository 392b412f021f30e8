"""``python -m mpu_bridge``: the ``mpu-bridge`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
