"""Typed errors of tuning runs (all are user errors: the CLI exits 2 with the message)."""

from __future__ import annotations

from registry.errors import LorafleetError


class ConfigError(LorafleetError):
    """The tuning config (YAML plus overrides) is invalid; lists every problem."""


class DataError(LorafleetError):
    """A data file or row cannot be used; names the file, the line and the field."""


class PackingUnsupported(LorafleetError):
    """The model would attend across packed examples; packing is refused."""


class RetrainError(LorafleetError):
    """A retraining job cannot run: no production version, its data is gone, bad settings."""
