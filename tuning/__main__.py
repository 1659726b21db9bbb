"""`python -m tuning CONFIG.yaml [KEY=VALUE ...]`: `lorafleet tune` for launchers that run
modules (torchrun -m, accelerate launch -m)."""

from __future__ import annotations

import sys

from registry.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
