"""Service plumbing: the daemon that wires the stages, and what runs beside them.

``daemon`` (start, stop, housekeeping), ``paths`` (the state folder's layout), ``plumbing``
(health/metrics server, disk guard and systemd notify as one handle), ``health``, ``notify``,
``diskguard``, ``qcjob`` (periodic QC over the outbox).
"""
