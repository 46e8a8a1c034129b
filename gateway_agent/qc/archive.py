"""Fleet QC over a central DICOMweb archive: QIDO-RS listing, WADO-RS samples, a feature cache.

Every edge box uploads to the same archive, so the archive is where the whole fleet can be seen.
:class:`ArchiveQC` lists the archive's studies (QIDO-RS, paged) with their instance counts; the
series of a study it has not seen, or whose count changed, are listed in turn. Of each series it
has not measured yet it fetches a few instances (WADO-RS), spread over the series as the agent's
QC job spreads its sample, and keeps their features in a local SQLite :class:`FeatureCache`,
committed series by series: a rerun (or a run after a kill) lists the studies and fetches only
what is new. A series of at most ``slices_per_series`` instances is retrieved whole (one
request); of a larger one, each sampled instance is found with a one-result QIDO-RS query
(``limit=1&offset=i``), so the archive never lists (nor, for Orthanc, reads) a whole series.
Requests run in a bounded thread pool; at most ``2 x workers`` series are in flight, each
holding at most ``slices_per_series`` instances in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from .._exceptions import QCError
from ..logs import get_logger
from .progress import Progress
from .sample import pick_spread

if TYPE_CHECKING:
    from .features import ScanFeatures

# pydicom and numpy (the features) are imported when a series is measured or records
# are read: a rerun that finds nothing new does without them (about a second of start-up).

__all__ = [
    "NON_IMAGE_MODALITIES",
    "ArchiveQC",
    "ArchiveRun",
    "FeatureCache",
    "SeriesRef",
    "archive_key",
]

log = get_logger()

#: Series of these modalities carry no image QC can measure: listed, never fetched.
NON_IMAGE_MODALITIES = frozenset(
    {"AU", "DOC", "ECG", "FID", "KO", "PLAN", "PR", "REG", "RTPLAN", "RTRECORD", "RTSTRUCT"}
    | {"RWV", "SEG", "SR"}
)
#: Studies per QIDO-RS page.
PAGE_SIZE = 500
#: Attempts per request on a retriable failure (timeout, network error, 408, 429, 5xx).
ATTEMPTS = 3
#: An instance larger than this is not fetched whole (reported as ``too_large``).
MAX_INSTANCE_BYTES = 256 << 20
#: The fleet model is fitted on at most this many records (the newest series first).
MAX_RECORDS = 20_000

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_MODALITY, _INSTANCE_NUMBER = "00080060", "00200013"
_STUDY_INSTANCES, _SERIES_INSTANCES = "00201208", "00201209"
_DICOM_JSON = "application/dicom+json"
_WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: A QIDO-RS answer larger than this is refused (a page of studies is ~1 kB per study).
_JSON_LIMIT = 64 << 20


def archive_key(base_url: str) -> str:
    """The archive's base URL without credentials, query or trailing slash (the cache key)."""
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), host.lower(), parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class SeriesRef:
    """One series of the archive, as listed by QIDO-RS (de-identified UIDs)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    #: NumberOfSeriesRelatedInstances as listed (None when the archive does not say)
    instances: int | None = None


@dataclass
class ArchiveRun:
    """What one :meth:`ArchiveQC.run` did, and the records the report is built from.

    ``studies`` were listed, of which ``studies_listed`` had their series listed (new or
    changed); ``listed`` series are in this run, ``to_fetch`` of them were not measured yet.
    """

    #: the run's number in the cache
    run: int = 0
    studies: int = 0
    studies_listed: int = 0
    listed: int = 0
    skipped_modality: int = 0
    cached: int = 0
    to_fetch: int = 0
    fetched: int = 0
    unmeasurable: int = 0
    failed: int = 0
    instances: int = 0
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    records: list[ScanFeatures] = field(default_factory=list)
    #: ``("series <uid>", reason)`` for series that failed or hold nothing measurable, and
    #: ``("study <uid>", reason)`` for studies whose series could not be listed
    failures: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The counters (no records) as a JSON-safe dict."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("records", "failures", "run")}
        out["seconds"] = round(self.seconds, 3)
        return out


class _FetchError(Exception):
    """A series could not be fetched; ``reason`` is a short slug (``http_404``, ``timeout``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Outcome:
    ref: SeriesRef
    status: str = "failed"  # ok | unmeasurable | failed
    reason: str = ""
    records: list[ScanFeatures] = field(default_factory=list)
    instances: int = 0
    requests: int = 0
    bytes: int = 0


_SCHEMA = (
    """
    create table if not exists runs (
        id integer primary key,
        archive text not null,
        started_at real not null
    )
    """,
    """
    create table if not exists studies (
        id integer primary key,
        archive text not null,
        study_uid text not null,
        instances integer,
        seen_run integer not null,
        unique (archive, study_uid)
    )
    """,
    """
    create table if not exists series (
        id integer primary key,
        archive text not null,
        series_uid text not null,
        study_uid text not null,
        modality text not null default '',
        instances integer,
        status text not null default 'pending',
        reason text,
        fetched_at real,
        features text,
        seen_run integer not null,
        unique (archive, series_uid)
    )
    """,
    "create index if not exists series_run on series (archive, seen_run, status)",
    "create index if not exists series_study on series (archive, study_uid)",
)

#: Statuses a run fetches (a failed series is tried again on the next run).
_TODO = ("pending", "failed")


class FeatureCache:
    """Features of measured series per archive, in one SQLite file (WAL, one connection).

    A series is ``pending`` when listed (or listed again with another instance count), then
    ``ok`` (features stored), ``unmeasurable`` (no instance with measurable pixels: not fetched
    again) or ``failed`` (an archive or network error: fetched again next run), or ``skipped``
    (a non-image modality). ``seen_run`` is the last run that listed it (or its unchanged
    study): a report covers the series the archive still lists. A study's instance count is
    stored once its series are listed; the same count later means the same series.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute("pragma journal_mode = wal")
        self._conn.execute("pragma synchronous = normal")
        self._conn.execute("pragma busy_timeout = 10000")
        with self._tx() as c:
            for ddl in _SCHEMA:
                c.execute(ddl)

    def _tx(self) -> _Transaction:
        return _Transaction(self._conn, self._lock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_run(self, archive: str) -> int:
        with self._tx() as c:
            cur = c.execute(
                "insert into runs (archive, started_at) values (?, ?)", (archive, time.time())
            )
            return int(cur.lastrowid or 0)

    def unchanged_studies(
        self, archive: str, run: int, studies: Sequence[tuple[str, int | None]]
    ) -> set[str]:
        """Of ``(study UID, instance count)``, the studies known with that count; they and their
        series are marked seen in ``run``."""
        known: set[str] = set()
        with self._tx() as c:
            for study, count in studies:
                if count is None:
                    continue
                row = c.execute(
                    "select instances from studies where archive = ? and study_uid = ?",
                    (archive, study),
                ).fetchone()
                if row is not None and row[0] == count:
                    known.add(study)
            c.executemany(
                "update studies set seen_run = ? where archive = ? and study_uid = ?",
                [(run, archive, u) for u in known],
            )
            c.executemany(
                "update series set seen_run = ? where archive = ? and study_uid = ?",
                [(run, archive, u) for u in known],
            )
        return known

    def list_study(
        self, archive: str, run: int, study: str, count: int | None, refs: Sequence[SeriesRef]
    ) -> None:
        """Record the listed series of a study (new ones pending, grown ones pending again,
        non-image ones skipped) and the study's instance count."""
        rows = [
            (
                archive,
                r.series_uid,
                r.study_uid,
                r.modality,
                r.instances,
                "skipped" if r.modality.upper() in NON_IMAGE_MODALITIES else "pending",
                run,
            )
            for r in refs
        ]
        with self._tx() as c:
            c.executemany(
                "insert into series (archive, series_uid, study_uid, modality, instances,"
                " status, seen_run) values (?, ?, ?, ?, ?, ?, ?)"
                " on conflict (archive, series_uid) do update set seen_run = excluded.seen_run,"
                " status = case when instances is not excluded.instances"
                " and status != 'skipped' then 'pending' else status end,"
                " instances = excluded.instances",
                rows,
            )
            c.execute(
                "insert into studies (archive, study_uid, instances, seen_run) values (?, ?, ?, ?)"
                " on conflict (archive, study_uid) do update set instances = excluded.instances,"
                " seen_run = excluded.seen_run",
                (archive, study, count, run),
            )

    def counts(self, archive: str, run: int) -> Counter[str]:
        """Series of this run by status."""
        with self._tx() as c:
            rows = c.execute(
                "select status, count(*) from series where archive = ? and seen_run = ?"
                " group by status",
                (archive, run),
            ).fetchall()
        return Counter({str(s): int(n) for s, n in rows})

    def todo(self, archive: str, run: int, after: int, limit: int) -> list[tuple[int, SeriesRef]]:
        """Series of this run still to fetch, by id, after ``after``."""
        with self._tx() as c:
            rows = c.execute(
                "select id, study_uid, series_uid, modality, instances from series"
                " where archive = ? and seen_run = ? and status in (?, ?) and id > ?"
                " order by id limit ?",
                (archive, run, *_TODO, after, limit),
            ).fetchall()
        return [(int(i), SeriesRef(st, se, mod, n)) for i, st, se, mod, n in rows]

    def store(self, archive: str, outcome: _Outcome) -> None:
        """Commit one series' outcome (its features when measured)."""
        features = json.dumps([r.as_json() for r in outcome.records]) if outcome.records else None
        with self._tx() as c:
            c.execute(
                "update series set status = ?, reason = ?, fetched_at = ?, features = ?"
                " where archive = ? and series_uid = ?",
                (
                    outcome.status,
                    outcome.reason or None,
                    time.time(),
                    features,
                    archive,
                    outcome.ref.series_uid,
                ),
            )

    def records(self, archive: str, run: int, limit: int = MAX_RECORDS) -> list[ScanFeatures]:
        """Features of this run's measured series (the newest series first, up to ``limit``)."""
        from .features import ScanFeatures

        out: list[ScanFeatures] = []
        after: int | None = None
        while len(out) < limit:
            with self._tx() as c:
                rows = c.execute(
                    "select id, features from series where archive = ? and seen_run = ?"
                    " and status = 'ok' and id < ? order by id desc limit 500",
                    (archive, run, after if after is not None else 1 << 62),
                ).fetchall()
            if not rows:
                break
            for row_id, text in rows:
                after = int(row_id)
                out.extend(ScanFeatures.from_json(d) for d in json.loads(text))
        out = out[:limit]
        out.reverse()  # oldest first, as a folder's QC lists them
        return out

    def fingerprint(self, archive: str, run: int, *params: object) -> str:
        """A digest of what this run's report would be built from (series, states, params).

        Two runs with the same fingerprint give the same report: a rerun that fetched nothing
        new can keep the report it has.
        """
        digest = hashlib.sha256(repr((archive, params)).encode())
        with self._tx() as c:
            rows = c.execute(
                "select series_uid, status, reason, fetched_at from series where archive = ?"
                " and seen_run = ? order by id",
                (archive, run),
            )
            for row in rows:
                digest.update(repr(row).encode())
        return digest.hexdigest()

    def failures(self, archive: str, run: int) -> list[tuple[str, str]]:
        """``("series <uid>", reason)`` of this run's failed and unmeasurable series."""
        with self._tx() as c:
            rows = c.execute(
                "select series_uid, status, reason from series where archive = ? and"
                " seen_run = ? and status in ('failed', 'unmeasurable') order by id",
                (archive, run),
            ).fetchall()
        return [(f"series {uid}", str(reason or status)) for uid, status, reason in rows]


class _Transaction:
    """``with`` one lock-guarded ``begin immediate`` ... ``commit`` (rollback on error)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self._conn, self._lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("begin immediate")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self._conn.execute("rollback" if exc_type is not None else "commit")
        finally:
            self._lock.release()


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The body parts of a ``multipart/related`` WADO-RS response (or a bare DICOM body)."""
    main, _, params = content_type.partition(";")
    main = main.strip().lower()
    if main == "application/dicom":
        return [body]
    if main != "multipart/related":
        raise _FetchError("unexpected_content_type")
    match = re.search(r'boundary="?([^";]+)"?', params)
    if match is None:
        raise _FetchError("no_multipart_boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts = []
    start = body.find(delimiter)
    while start >= 0 and body[start + len(delimiter) : start + len(delimiter) + 2] != b"--":
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            raise _FetchError("malformed_multipart")
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        parts.append(body[head_end + 4 : end if end >= 0 else len(body)])
        start = end + 2 if end >= 0 else -1
    if not parts:
        raise _FetchError("malformed_multipart")
    return parts


def _count(item: dict[str, Any], tag: str) -> int | None:
    value = _value(item, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class ArchiveQC:
    """Fleet QC of the series of one DICOMweb archive, through a local feature cache.

    Parameters
    ----------
    client
        The HTTP client (credentials, TLS and timeouts set on it); the caller closes it.
    base_url
        The archive's DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``.
    cache
        Where features are kept between runs.
    slices_per_series
        Instances measured per series (spread over the series, ends avoided).
    workers
        Requests in parallel (series fetched and measured, or studies' series listed).
    progress
        A progress bar on stderr; ``None``: when stderr is a terminal.
    """

    def __init__(
        self,
        client: httpx.Client,
        base_url: str,
        cache: FeatureCache,
        *,
        slices_per_series: int = 3,
        workers: int = 4,
        page_size: int = PAGE_SIZE,
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
        progress: bool | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if slices_per_series < 1:
            raise ValueError('Argument "slices_per_series" must be at least 1.')
        if workers < 1:
            raise ValueError('Argument "workers" must be at least 1.')
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.archive = archive_key(base_url)
        self.cache = cache
        self.slices_per_series = slices_per_series
        self.workers = workers
        self.page_size = page_size
        self.max_instance_bytes = max_instance_bytes
        self.progress = progress
        self._sleep = sleep
        self._listing_requests = self._listing_bytes = 0

    # ------------------------------------------------------------------ requests
    def _request(
        self, url: str, params: Any, accept: str, outcome: _Outcome, limit: int | None = None
    ) -> tuple[str, bytes]:
        """GET with retries: ``(Content-Type, body)``, the body at most ``limit`` bytes.

        Raises :class:`_FetchError` with a reason.
        """
        reason = "unknown"
        limit = limit or self.max_instance_bytes
        for attempt in range(ATTEMPTS):
            if attempt:
                self._sleep(min(30.0, 0.5 * 2**attempt))
            try:
                with self.client.stream(
                    "GET", url, params=params, headers={"Accept": accept}
                ) as response:
                    outcome.requests += 1
                    status = response.status_code
                    if status >= 300:
                        response.read()
                        outcome.bytes += len(response.content)
                        reason = f"http_{status}"
                        if status in (408, 429) or status >= 500:
                            retry_after = response.headers.get("Retry-After", "")
                            if retry_after.isdigit():
                                self._sleep(min(30.0, float(retry_after)))
                            continue
                        raise _FetchError(reason)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            outcome.bytes += len(body)
                            raise _FetchError("too_large")
                    outcome.bytes += len(body)
                    return response.headers.get("Content-Type", ""), bytes(body)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.TransportError as exc:
                reason = f"network_error: {type(exc).__name__}"
        raise _FetchError(reason)

    def _json_list(
        self, url: str, params: Any, outcome: _Outcome, what: str = "qido_not_json"
    ) -> list[dict[str, Any]]:
        """A QIDO-RS answer: a list of DICOM JSON objects (``[]`` for an empty body/204)."""
        _type, body = self._request(url, params, _DICOM_JSON, outcome, _JSON_LIMIT)
        try:
            items = json.loads(body) if body.strip() else []
        except ValueError:
            raise _FetchError(what) from None
        if not isinstance(items, list):
            raise _FetchError(what)
        return [item for item in items if isinstance(item, dict)]

    # ------------------------------------------------------------------ listing
    def list_studies(self, since: date | None = None) -> Iterator[list[tuple[str, int | None]]]:
        """Pages of ``(Study Instance UID, number of instances)`` (QIDO-RS ``/studies``).

        ``since`` matches StudyDate (``YYYYMMDD-``). Raises :class:`QCError` when the archive
        cannot be listed (a wrong URL, credentials, or an archive that is down).
        """
        params: dict[str, Any] = {"limit": self.page_size, "includefield": _STUDY_INSTANCES}
        if since is not None:
            params["StudyDate"] = f"{since:%Y%m%d}-"
        offset = 0
        first_of_previous = None
        while True:
            outcome = _Outcome(SeriesRef("", ""))
            try:
                items = self._json_list(
                    f"{self.base_url}/studies", {**params, "offset": offset}, outcome, "not_json"
                )
            except _FetchError as exc:
                raise QCError(f"the archive cannot be listed ({exc.reason})") from None
            finally:
                self._listing_requests += outcome.requests
                self._listing_bytes += outcome.bytes
            page = []
            for item in items:
                study = _value(item, _STUDY)
                if isinstance(study, str) and _UID_RE.match(study):
                    page.append((study, _count(item, _STUDY_INSTANCES)))
            if not page or page[0][0] == first_of_previous:
                return  # the end, or an archive that ignores offset: stop rather than loop
            first_of_previous = page[0][0]
            yield page
            if len(items) < self.page_size:
                return
            offset += len(items)

    def _list_series(self, study: str) -> tuple[list[SeriesRef], _Outcome]:
        """The series of one study (QIDO-RS ``/studies/{uid}/series``)."""
        outcome = _Outcome(SeriesRef(study, ""))
        params = {"includefield": [_MODALITY, _SERIES_INSTANCES]}
        refs = []
        try:
            for item in self._json_list(f"{self.base_url}/studies/{study}/series", params, outcome):
                series, modality = _value(item, _SERIES), _value(item, _MODALITY)
                if isinstance(series, str) and _UID_RE.match(series):
                    refs.append(
                        SeriesRef(
                            study,
                            series,
                            modality if isinstance(modality, str) else "",
                            _count(item, _SERIES_INSTANCES),
                        )
                    )
            outcome.status = "ok"
        except _FetchError as exc:
            outcome.reason = exc.reason
        return refs, outcome

    # ------------------------------------------------------------------ one series
    def _sample(self, ref: SeriesRef, outcome: _Outcome) -> Iterator[bytes]:
        """The part-10 bytes of the series' sampled instances, one at a time."""
        series_url = f"{self.base_url}/studies/{ref.study_uid}/series/{ref.series_uid}"
        k = self.slices_per_series
        n = ref.instances
        if n is not None and 0 < n <= k:
            # Small series: every instance is in the sample; one request retrieves them all.
            kind, body = self._request(
                series_url, None, _WADO_ACCEPT, outcome, n * self.max_instance_bytes
            )
            yield from _parts(kind, body)
            return
        if n is not None and n > k:
            # One-result queries at the sampled positions (the archive's order: arrival).
            sops = []
            for position in pick_spread(range(n), k):
                found = self._json_list(
                    f"{series_url}/instances", {"limit": 1, "offset": position}, outcome
                )
                sop = _value(found[0], _SOP) if found else None
                if isinstance(sop, str) and _UID_RE.match(sop):
                    sops.append(sop)
            if not sops:
                raise _FetchError("no_instances")
        else:
            items = self._json_list(
                f"{series_url}/instances", {"includefield": _INSTANCE_NUMBER}, outcome
            )
            listed = [(_value(item, _INSTANCE_NUMBER), _value(item, _SOP)) for item in items]
            ordered = sorted(
                (number if isinstance(number, int) else 0, sop)
                for number, sop in listed
                if isinstance(sop, str) and _UID_RE.match(sop)
            )
            if not ordered:
                raise _FetchError("no_instances")
            sops = [sop for _number, sop in pick_spread(ordered, k)]
        for sop in sops:
            kind, body = self._request(f"{series_url}/instances/{sop}", None, _WADO_ACCEPT, outcome)
            yield _parts(kind, body)[0]

    def _fetch_series(self, ref: SeriesRef) -> _Outcome:
        import pydicom

        from .features import features_from_dataset

        outcome = _Outcome(ref)
        try:
            if not (_UID_RE.match(ref.study_uid) and _UID_RE.match(ref.series_uid)):
                raise _FetchError("invalid_uid")
            why: list[str] = []
            where = f"studies/{ref.study_uid}/series/{ref.series_uid}/instances/"
            for data in self._sample(ref, outcome):
                outcome.instances += 1
                try:
                    ds = pydicom.dcmread(io.BytesIO(data), force=True)
                    del data
                    sop = str(ds.get("SOPInstanceUID", "")).strip()
                    record = features_from_dataset(ds, file=where + sop)
                except QCError as exc:
                    why.append(str(exc))
                    continue
                except Exception as exc:  # pydicom raises many types for malformed input
                    why.append(f"cannot measure ({type(exc).__name__})")
                    continue
                outcome.records.append(record)
            if outcome.records:
                outcome.status = "ok"
            else:
                outcome.status, outcome.reason = "unmeasurable", why[0] if why else "no_instances"
        except _FetchError as exc:
            outcome.status, outcome.reason = "failed", exc.reason
        return outcome

    # ------------------------------------------------------------------ the run
    def run(self, since: date | None = None, *, records: bool = True) -> ArchiveRun:
        """List, fetch what is new, and return this run's records and failures.

        ``records=False`` leaves ``records`` empty (read them later with
        ``cache.records(qc.archive, result.run)``). Raises :class:`QCError` when the archive
        cannot be listed; a series that cannot be fetched is recorded as failed (and tried
        again next run), never raised.
        """
        t0 = time.perf_counter()
        result = ArchiveRun()
        self._listing_requests = self._listing_bytes = 0
        run = result.run = self.cache.new_run(self.archive)
        study_failures: list[tuple[str, str]] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="qc-archive") as pool:
            for page in self.list_studies(since):
                result.studies += len(page)
                known = self.cache.unchanged_studies(self.archive, run, page)
                changed = [(u, n) for u, n in page if u not in known]
                result.studies_listed += len(changed)
                listings = pool.map(lambda item: self._list_series(item[0]), changed)
                for (study, count), (refs, outcome) in zip(changed, listings, strict=True):
                    result.requests += outcome.requests
                    result.bytes += outcome.bytes
                    if outcome.status == "ok":
                        self.cache.list_study(self.archive, run, study, count, refs)
                    else:
                        study_failures.append((f"study {study}", outcome.reason))
            result.requests += self._listing_requests
            result.bytes += self._listing_bytes
            counts = self.cache.counts(self.archive, run)
            result.listed = sum(counts.values())
            result.skipped_modality = counts["skipped"]
            result.to_fetch = counts["pending"] + counts["failed"]
            result.cached = counts["ok"] + counts["unmeasurable"]
            log.info(
                "qc_archive_listed",
                studies=result.studies,
                studies_listed=result.studies_listed,
                series=result.listed,
                to_fetch=result.to_fetch,
                cached=result.cached,
                skipped_modality=result.skipped_modality,
            )
            if result.to_fetch:
                bar = Progress(result.to_fetch, enabled=self.progress, unit="series")
                self._fetch_all(pool, run, result, bar)
        if records:
            result.records = self.cache.records(self.archive, run)
        result.failures = study_failures + self.cache.failures(self.archive, run)
        result.failed += len(study_failures)
        result.seconds = time.perf_counter() - t0
        log.info("qc_archive_run", **result.summary())
        return result

    def _fetch_all(
        self, pool: ThreadPoolExecutor, run: int, result: ArchiveRun, bar: Progress
    ) -> None:
        in_flight: dict[Future[_Outcome], SeriesRef] = {}

        def collect(done: set[Future[_Outcome]]) -> None:
            for future in done:
                in_flight.pop(future)
                outcome = future.result()
                self.cache.store(self.archive, outcome)
                result.requests += outcome.requests
                result.bytes += outcome.bytes
                result.instances += outcome.instances
                if outcome.status == "ok":
                    result.fetched += 1
                elif outcome.status == "unmeasurable":
                    result.unmeasurable += 1
                else:
                    result.failed += 1
                bar.step()

        try:
            after = 0
            while batch := self.cache.todo(self.archive, run, after, 500):
                for row_id, ref in batch:
                    after = row_id
                    while len(in_flight) >= 2 * self.workers:
                        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                        collect(done)
                    in_flight[pool.submit(self._fetch_series, ref)] = ref
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                collect(done)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
