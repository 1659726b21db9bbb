"""`python -m registry ...` = `lorafleet ...`, also where the project is not installed."""

from registry.cli import main

raise SystemExit(main())
