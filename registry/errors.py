"""Typed errors of the registry.

Every user-facing failure of lorafleet derives from :class:`LorafleetError`; the CLI prints
its message on one line and exits 2, the HTTP layer maps its subclasses to status codes.
A message names the problem, the value, the limit and the fix.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """A failure the user can act on (bad input, missing object, refused operation)."""


class InvalidName(LorafleetError):
    """An adapter name, alias or model reference does not follow the grammar."""


class NotInitialized(LorafleetError):
    """No registry exists at the given home."""


class AlreadyInitialized(LorafleetError):
    """`init` was called on a registry that is already bound to a base model."""


class InvalidBaseModel(LorafleetError):
    """A base model directory cannot be read or fingerprinted."""


class InvalidAdapter(LorafleetError):
    """An adapter directory fails validation; nothing was registered."""


class AdapterConfigError(InvalidAdapter):
    """`adapter_config.json` is missing, unparseable or not a LoRA config."""


class AdapterWeightsError(InvalidAdapter):
    """Weights are missing, pickled, corrupt, or their shapes disagree with rank or base."""


class TargetModuleError(InvalidAdapter):
    """The adapter targets modules the base model does not have."""


class RankLimitError(InvalidAdapter):
    """The adapter's rank is above the registry's limit."""


class BaseMismatch(InvalidAdapter):
    """The adapter was trained on a different base model than the registry's."""


class InvalidMetadata(InvalidAdapter):
    """`lorafleet.json` (or --metadata) does not follow the metadata schema."""


class DuplicateContent(LorafleetError):
    """The same artifact content is already registered under this adapter name."""


class NotFound(LorafleetError):
    """An adapter, version or alias does not exist."""


class AliasConflict(LorafleetError):
    """An alias operation breaks an alias rule (archived target, no previous holder, ...)."""


class RegistryBusy(LorafleetError):
    """The database stayed locked by another process past the busy timeout."""


class CorruptArtifact(LorafleetError):
    """A stored artifact no longer matches its sha256 digest."""


class InvalidSettings(LorafleetError):
    """Adapter settings (`lorafleet registry settings`) do not follow their schema."""


class InvalidSchedule(LorafleetError):
    """A retraining schedule's interval or cron expression is invalid."""


class JobStateError(LorafleetError):
    """A retraining job is not in a state that allows the operation."""
