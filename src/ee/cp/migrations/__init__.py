"""Schema migrations of the CP record store (:mod:`ee.cp.records`), as package data.

One file per migration, ``NNNN_name.sql`` (four-digit version, lower-case name),
versions increasing; a gap is filled when its migration lands later.
:meth:`ee.cp.records.RecordStore.open` applies the pending ones in order, each in its own
transaction together with its ``schema_migrations`` row, on SQLite or PostgreSQL.

Rules for a new migration:

* add a file; never edit, rename or renumber one that has shipped (a store whose
  recorded name for a version differs from the file's is refused);
* no ``BEGIN``/``COMMIT`` inside: the runner owns the transaction, and SQLite DDL is
  transactional, so a failing migration leaves the store at the previous version;
* SQL must be portable (SQLite and PostgreSQL): ``INTEGER PRIMARY KEY`` becomes an
  identity column on PostgreSQL; engine-specific SQL goes in ``-- @sqlite`` /
  ``-- @postgresql … -- @end`` blocks; qualify the target table's columns in
  ``ON CONFLICT DO UPDATE``;
* a store written by newer code (a version this package does not have) is refused
  rather than guessed at: roll the code forward, or point the CP at another file.

The files live inside the package (not at the repository root) so an installed
``ee`` finds them through :mod:`importlib.resources`; ``migrations/`` at the root
only points here.
"""
