"""The adapter registry: the shared record of versions, aliases, artifacts and history.

Imported by `tuning` and `serving`; imports neither. `RequestLog` is the type of
`Registry.request_log`, here so that no module outside registry/ imports registry.storage.
"""

from registry.names import ModelRef, parse_model_ref
from registry.records import AliasMove, AliasRecord, Event, VersionMetadata, VersionRecord
from registry.registry import Registry, default_home
from registry.storage.requestlog import RequestLog

__all__ = [
    "AliasMove",
    "AliasRecord",
    "Event",
    "ModelRef",
    "Registry",
    "RequestLog",
    "VersionMetadata",
    "VersionRecord",
    "default_home",
    "parse_model_ref",
]
