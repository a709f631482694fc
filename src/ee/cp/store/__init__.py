"""Durable business state behind one interface, on two backends.

:mod:`ee.cp.store.backend` is the thin layer under :class:`ee.cp.records.RecordStore`:
one connection (``sqlite3`` for a file, psycopg 3 for a ``postgresql://`` URL), one
SQL dialect translation (``?`` placeholders, DDL substitutions, per-dialect blocks in
migrations), one error translation. :mod:`ee.cp.store.ledger` is the billing ledger's
SQL (double-entry transactions, usage windows, meter runs, price books, holds) and the
invariant check ``eectl billing verify`` runs; it is written once, in the portable
subset, and runs in the store's worker thread.
"""
