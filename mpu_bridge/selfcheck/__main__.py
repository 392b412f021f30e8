"""``python -m mpu_bridge.selfcheck [options]``: the same as ``mpu-bridge selfcheck [options]``."""

from __future__ import annotations

if __name__ == "__main__":
    # Through the package (not names defined in this __main__ module), so ranks
    # unpickle the same classes the parent uses.
    from mpu_bridge.selfcheck import main

    raise SystemExit(main())
