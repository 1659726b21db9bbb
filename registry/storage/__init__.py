"""The registry's storage: every SQL statement of lorafleet (registry/, tuning/, serving/)
lives in this package.

`Registry` (registry/registry.py) and `Jobs` (registry/jobs_api.py) call the functions of
the modules here; nothing outside registry/ imports this package, and no module of
registry/ outside it holds SQL or imports sqlite3 (tests/test_layout.py checks both). The
records these functions return (registry/records.py, registry/loop_records.py) carry no
storage.

The seam is `Database` and `Transaction` (sqlite.py, SQLite in WAL mode). A second backend
(PostgreSQL, for many replicas sharing one registry, is planned) implements them as they
are used here:

- `Database(path, busy_timeout_s=None)`: opens the store and brings its schema up to date
  (idempotent, safe when several processes open it at once);
- `Database.query(sql, params=()) -> list[row]`: one read;
- `Database.snapshot()`: a context manager giving a connection whose `execute(sql, params)`
  runs several reads that see one consistent state;
- `Database.write(what) -> Transaction`: a context manager; the transaction takes the write
  lock at its start (`BEGIN IMMEDIATE`), so read-modify-write sequences of several
  processes serialize; committed on success, rolled back on any error; a lock held by
  another process for longer than `busy_timeout_s` raises `RegistryBusy` naming `what`,
  with nothing written;
- `Database.busy_timeout_s` (seconds; the request log waits as long) and
  `Database.close()`;
- `Database.integrity_problems() -> list[str]`: the store's own consistency check, empty
  when sound (`fsck`);
- `Transaction.execute(sql, params=())`: a cursor with `fetchone()`, `fetchall()`,
  iteration, `rowcount` and `lastrowid`;
- `Transaction.revision`: bumps the registry's revision counter once per transaction, on
  first use, and returns it (the change feed servers poll).

Rows are read by column name and by position (`row["version"]`, `row[0]`, `dict(row)`), as
`sqlite3.Row` is. The SQL passed through the seam is SQLite's dialect (`?` placeholders,
`INSERT ... ON CONFLICT ... DO UPDATE`, `RETURNING`, `LIMIT ... OFFSET`, a boolean summed as
an integer), so a second backend accepts or translates it. The functions that take either
a database or an open transaction tell the two apart with `isinstance(db, Database)`.

`RequestLog` (requestlog.py) is a store of its own, a SQLite file beside the registry's,
with `append`, `prune`, `delete`, `read`, `counts` and `close`; a second backend implements
it too, or keeps the log local to each server.
"""
