"""The outbox: the durable SQLite record of every de-identified instance and its upload state.

``store`` (the ``Outbox``), ``_sqlite`` (connection, pragmas and transactions, shared with the
QC job's tables in the same database file).
"""
