"""Intake: complete inbox files in, de-identified outbox rows out; bad inputs to the quarantine.

``watcher`` (inotify and scans: when is a file complete), ``pipeline`` (the ``Intake``: queue,
worker pool, worker deaths, pausing), ``worker`` (what runs in the worker processes), ``commit``
(the group commit to the outbox), ``originals`` (then the original is deleted, archived or
kept), ``quarantine`` (inputs that cannot be processed, with a machine-readable reason).
"""
