"""The registry's storage: every SQL statement of lorafleet (registry/, tuning/, serving/)
lives in this package.

`Registry` (registry/registry.py) and `Jobs` (registry/jobs_api.py) call the functions of
the modules here; nothing outside registry/ imports this package, and no module of
registry/ outside it holds SQL or imports sqlite3 (tests/test_layout.py checks both). The
records these functions return (registry/records.py, registry/loop_records.py) carry no
storage.

The seam is `Database` and `Transaction` (backend.py), implemented by SQLite in WAL mode
(sqlite.py, the embedded default) and PostgreSQL (postgres.py, a registry many hosts
share); `open_database(location)` picks one from a path or a ``postgresql://`` URL:

- `Database.query(sql, params=()) -> list[row]`: one read;
- `Database.snapshot()`: a context manager giving a reader whose `execute(sql, params)`
  runs several reads that see one consistent state;
- `Database.write(what) -> Transaction`: a context manager; the transaction takes the
  registry's write lock at its start, so read-modify-write sequences of several processes
  serialize; committed on success, rolled back on any error; a lock held by another
  process for longer than `busy_timeout_s` raises `RegistryBusy` naming `what`, with
  nothing written;
- `Database.artifacts_lock(exclusive)`: registrations (shared) against fsck/gc (exclusive);
- `Database.wait_for_change(timeout_s)`: returns early when PostgreSQL notifies a change;
- `Database.integrity_problems() -> list[str]`: the store's own consistency check, empty
  when sound (`fsck`); `busy_timeout_s`, `location`, `dialect` and `close()`;
- `Transaction.execute(sql, params=())`: a cursor with `fetchone()`, `fetchall()`,
  iteration and `rowcount` (inserts that need their id say `RETURNING id`);
- `Transaction.revision`: bumps the registry's revision counter once per transaction, on
  first use, and returns it (the change feed servers poll, or are notified of).

Rows are read by column name and by position (`row["version"]`, `row[0]`, `dict(row)`).
The SQL passed through the seam is written in the dialect both backends accept (`?`
placeholders, `INSERT ... ON CONFLICT ... DO UPDATE`, `RETURNING`, `LIMIT ... OFFSET`);
postgres.py rewrites the placeholders. The functions that take either a database or an
open transaction tell the two apart with `isinstance(db, Database)`.

`RequestLog` (requestlog.py) is a store of its own, a SQLite file in each home, with
`append`, `prune`, `delete`, `read`, `counts` and `close`.
"""
