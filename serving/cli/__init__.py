"""The serving commands of `lorafleet`: serve, drift report, canary status and verdicts."""
