"""The daemon, laid out along the way a file travels.

::

    scanner ─▶ inbox/ ─▶ intake ─────────────────▶ outbox ───────────────▶ upload ─▶ destination
               intake/watcher    intake/pipeline    outbox/store           upload/uploader
               (complete files)  (de-identify in    (SQLite: a row per     (claim, send, record;
                                 worker processes,   instance, its state,   the circuit)
                                 commit the row,     retries, the           upload/destinations/
                                 then dispose of     destination circuit)   (one module per kind
                                 the original)                              behind one contract)
                                       │
                                       └─▶ intake/quarantine (reason.json; never uploaded)

    service/   wires the stages together (daemon), state paths, health and /metrics, systemd
               notify, the disk guard, the periodic QC job
    metrics    the Prometheus counters every stage updates (no PHI in any label)

Each stage hands the next a durable record and never imports a later one: intake does not know
upload, upload does not know intake, the outbox knows neither, and only ``service`` (and the
command line above it) sees them all. ``tests/test_layers.py`` keeps it so.

Sub-packages hold no code in their ``__init__``; import from the module that defines a name.
"""
