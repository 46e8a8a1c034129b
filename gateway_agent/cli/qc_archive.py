"""``gateway-agent qc --dicomweb URL``: fleet QC over a central archive (options and command)."""

from __future__ import annotations

import argparse
import ssl
import sys
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._exceptions import ConfigError, QCError

__all__ = ["add_archive_arguments", "cmd_qc_archive"]

_SHOWN_FAILURES = 10


def _since(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a date: YYYY-MM-DD") from None


def add_archive_arguments(qc: argparse.ArgumentParser) -> None:
    """The archive options of ``qc``: the URL, what to fetch, credentials and TLS."""
    g = qc.add_argument_group(
        "fleet QC over a DICOMweb archive",
        "Credentials and TLS as for the DICOMweb destination; secrets only from files.",
    )
    g.add_argument(
        "--dicomweb", metavar="URL", default=None, help="the archive's DICOMweb root (QIDO/WADO-RS)"
    )
    g.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="DATE",
        help="only series with a StudyDate from DATE on (archive dates are de-identified dates)",
    )
    g.add_argument(
        "--cache", type=Path, default=None, help="feature cache (default: REPORT/qc-cache.db)"
    )
    g.add_argument("--slices", type=int, default=3, help="instances measured per series (3)")
    g.add_argument("--auth", choices=["none", "basic", "bearer"], default="none")
    g.add_argument("--username", default=None, help="for --auth basic")
    g.add_argument("--password-file", type=Path, default=None, help="for --auth basic")
    g.add_argument("--token-file", type=Path, default=None, help="for --auth bearer")
    g.add_argument("--ca-bundle", type=Path, default=None, help="CA certificates (PEM)")
    g.add_argument("--client-cert", type=Path, default=None, help="client certificate (PEM)")
    g.add_argument("--client-key", type=Path, default=None, help="its key (PEM)")
    g.add_argument(
        "--no-verify-tls", action="store_true", help="do not verify the server's certificate"
    )
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")


def _client(args: argparse.Namespace, workers: int) -> Any:
    """An httpx client with the archive's credentials and TLS settings, checked as for the
    DICOMweb destination (a problem is a :class:`ConfigError`)."""
    import httpx

    from ..config import read_secret_file

    url: str = args.dicomweb
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--dicomweb: the URL must start with http:// or https://")
    if parts.username or parts.password:
        raise ConfigError(
            "--dicomweb: the URL must not carry credentials; use --auth with --password-file "
            "or --token-file"
        )
    if args.timeout <= 0:
        raise ConfigError("--timeout must be more than 0 seconds")
    headers: dict[str, str] = {}
    auth: httpx.Auth | None = None
    if args.auth == "basic":
        if not args.username or args.password_file is None:
            raise ConfigError("--auth basic needs --username and --password-file")
        auth = httpx.BasicAuth(
            args.username, read_secret_file(args.password_file, "--password-file")
        )
    elif args.auth == "bearer":
        if args.token_file is None:
            raise ConfigError("--auth bearer needs --token-file")
        headers["Authorization"] = "Bearer " + read_secret_file(args.token_file, "--token-file")
    elif args.username or args.password_file or args.token_file:
        raise ConfigError(
            "--username, --password-file and --token-file need --auth basic or bearer"
        )
    if args.client_key is not None and args.client_cert is None:
        raise ConfigError("--client-key needs --client-cert")
    verify: bool | ssl.SSLContext = not args.no_verify_tls
    if parts.scheme == "https":
        try:
            if args.ca_bundle is not None:
                verify = ssl.create_default_context(cafile=str(args.ca_bundle))
            elif not args.no_verify_tls or args.client_cert is not None:
                import certifi

                verify = ssl.create_default_context(cafile=certifi.where())
                if args.no_verify_tls:
                    verify.check_hostname = False
                    verify.verify_mode = ssl.CERT_NONE
            if args.client_cert is not None and isinstance(verify, ssl.SSLContext):
                key = str(args.client_key) if args.client_key is not None else None
                verify.load_cert_chain(str(args.client_cert), key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files: {exc.strerror or type(exc).__name__}") from None
    return httpx.Client(
        auth=auth,
        headers=headers,
        verify=verify,
        timeout=httpx.Timeout(args.timeout, connect=min(10.0, args.timeout)),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=workers + 2, max_keepalive_connections=workers + 2),
    )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _report_fingerprint(report_dir: Path) -> str | None:
    """The fingerprint of the archive report already in ``report_dir`` (None when none)."""
    import json

    try:
        data = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
        value = data["archive"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def cmd_qc_archive(args: argparse.Namespace) -> int:
    """``gateway-agent qc --dicomweb URL``: the archive's series through the feature cache."""
    from ..qc.archive import ArchiveQC, FeatureCache, archive_key

    if args.slices < 1:
        raise ConfigError("--slices must be at least 1")
    if args.clusters < 1:
        raise ConfigError("--clusters must be at least 1")
    workers = args.workers or 4
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    client = _client(args, workers)
    cache_path = args.cache or args.report / "qc-cache.db"
    try:
        with client, FeatureCache(cache_path) as cache:
            qc = ArchiveQC(
                client,
                args.dicomweb,
                cache,
                slices_per_series=args.slices,
                workers=workers,
                progress=False if args.no_progress else None,
            )
            run = qc.run(args.since, records=False)
            fingerprint = cache.fingerprint(
                qc.archive, run.run, args.slices, args.clusters, str(args.since or "")
            )
            up_to_date = _report_fingerprint(args.report) == fingerprint
            if not up_to_date:
                run.records = cache.records(qc.archive, run.run)
    except QCError as exc:
        print(
            f"gateway-agent qc: {exc}: check --dicomweb, the credentials and the TLS options",
            file=sys.stderr,
        )
        return 2
    where = archive_key(args.dicomweb)
    print(
        f"fleet QC of {where}: {run.studies} studies ({run.studies_listed} new or changed), "
        f"{run.listed} series: {run.fetched} fetched, {run.cached} from the cache, "
        f"{run.failed} failed, {run.unmeasurable} unmeasurable, {run.skipped_modality} not "
        f"images; {run.instances} instances, {run.requests} requests, {_size(run.bytes)} "
        f"in {run.seconds:.1f} s"
    )
    if up_to_date:
        # Same series, same states, same options: the report there is this run's report.
        print(f"nothing new: the report in {args.report} is up to date")
        return 0 if not run.failed else 1
    if not run.records:
        print("QC: no measurable series in the archive")
        return 1
    from ..qc import analyse_fleet, summary_text, write_report  # the fleet model, matplotlib

    _matrix, labels, silhouette = analyse_fleet(run.records, args.clusters)
    extra = {
        "archive": {
            "url": where,
            "since": str(args.since or ""),
            **run.summary(),
            "fingerprint": fingerprint,
        }
    }
    paths = write_report(run.records, labels, silhouette, args.report, run.failures, extra)
    print(summary_text(run.records, labels, silhouette, run.failures))
    failed = [f for f in run.failures if not f[1].startswith(("no pixel", "cannot measure"))]
    for series, reason in failed[:_SHOWN_FAILURES]:
        print(f"  x {series}: {reason}")
    if len(failed) > _SHOWN_FAILURES:
        print(f"  ... and {len(failed) - _SHOWN_FAILURES} more (see report.json)")
    print("report: " + ", ".join(str(p) for p in [*paths.values(), cache_path]))
    return 0 if not run.failed else 1
