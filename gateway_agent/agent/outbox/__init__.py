"""The outbox: the durable SQLite record of every de-identified instance and its upload state.

``store`` (the ``Outbox`` every other stage uses), and its parts: ``db`` (schema, connection,
adding and reading rows), ``delivery`` (claims and outcomes), ``circuit`` (the destination-level
circuit), ``upkeep`` (retention, reconcile); ``_sqlite`` (connection, pragmas, transactions, shared
with the QC job's tables in the same database file).
"""
