"""The adapter registry: the shared record of versions, aliases, artifacts and history.

Imported by `tuning` and `serving`; imports neither.
"""

from registry.names import ModelRef, parse_model_ref
from registry.records import AliasMove, AliasRecord, Event, VersionMetadata, VersionRecord
from registry.registry import Registry, default_home

__all__ = [
    "AliasMove",
    "AliasRecord",
    "Event",
    "ModelRef",
    "Registry",
    "VersionMetadata",
    "VersionRecord",
    "default_home",
    "parse_model_ref",
]
