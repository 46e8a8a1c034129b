"""Intake: complete inbox files in, de-identified outbox rows out; bad inputs to the quarantine.

``watcher`` (inotify and scans: when is a file complete), ``pipeline`` (the de-identification
worker pool and the group commit to the outbox, then the original is removed, archived or kept),
``quarantine`` (inputs that cannot be processed, with a machine-readable reason).
"""
