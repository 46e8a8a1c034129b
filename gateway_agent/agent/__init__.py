"""The daemon: watcher, intake, SQLite outbox, uploader, destinations, QC job, health, metrics."""
