"""The outbox: the durable SQLite record of every de-identified instance and its upload state.

``store`` (the ``Outbox`` every other stage uses, and a ``DestinationQueue`` per destination), and
its parts: ``db`` (connection, adding and reading rows), ``schema`` (tables, recorded version,
upgrades of older outboxes), ``routing`` (which destinations an instance goes to), ``delivery``
(claims and outcomes, per destination), ``circuit`` (each destination's circuit), ``upkeep``
(retention, reconcile); ``_sqlite`` (connection, pragmas, transactions, shared with the QC job's
tables in the same database file).
"""
