"""The daemon: watcher, intake, SQLite outbox, uploader and destinations, QC job, health and metrics."""
