"""De-identification (PS3.15 Annex E 2024e): options, file and Dataset entry points, site secret.

The hot path (:meth:`Deidentifier.deidentify_file`) never imports pydicom: it parses the header
with :mod:`gateway_agent.dicom`, rewrites it and copies the pixel data element byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import DeidError
from ..dicom.codec import PIXEL_TAGS, Element, encode_dataset, parse_dataset
from ..dicom.files import Header, SourceFile, write_part10
from .engine import METHOD, Engine, Outcome
from .keys import Keys, load_or_create_secret
from .profile import EDITION, DeidOptions, load_rows, profile_for
from .safeprivate import SAFE_PRIVATE_PIXEL_DATA, safe_private_table

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

    from .pixels.clean import PixelJob

__all__ = [
    "EDITION",
    "IMPLEMENTATION_CLASS_UID",
    "METHOD",
    "SAFE_PRIVATE_PIXEL_DATA",
    "TAGS_TO_REMOVE",
    "DeidError",
    "DeidOptions",
    "DeidResult",
    "Deidentifier",
    "anonymize_dataset",
    "load_or_create_secret",
    "safe_private_table",
]

#: Our Implementation Class UID (file meta), derived once from the product name.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    int.from_bytes(hashlib.sha256(b"gateway-agent implementation").digest()[:16], "big")
)
IMPLEMENTATION_VERSION_NAME = "GATEWAY_AGENT_1"

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


class DeidResult:
    """One de-identified instance written to disk (all values are output values: no PHI).

    Returned by :meth:`Deidentifier.deidentify_file`.

    Attributes
    ----------
    path : pathlib.Path
        The output file, ``<out_dir>/<new SOP Instance UID>.dcm``.
    sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid : str
        The output's UIDs.
    modality : str
        The output's Modality.
    size : int
        The output file's size in bytes.
    audit : dict
        The audit record: actions per tag class, options, UIDs; never a value of the input.
    scanner : str
        The keyed scanner pseudonym (``SCN-`` and 12 hex digits) of the original device, as
        written into the output (see ``docs/qc.md``).
    """

    __slots__ = (
        "audit",
        "modality",
        "path",
        "scanner",
        "series_instance_uid",
        "size",
        "sop_class_uid",
        "sop_instance_uid",
        "study_instance_uid",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        modality: str,
        size: int,
        audit: dict[str, Any],
        scanner: str = "",
    ) -> None:
        self.path = Path(path)
        self.sop_instance_uid = sop_instance_uid
        self.sop_class_uid = sop_class_uid
        self.study_instance_uid = study_instance_uid
        self.series_instance_uid = series_instance_uid
        self.modality = modality
        self.size = size
        self.audit = audit
        self.scanner = scanner

    @property
    def name(self) -> str:
        """The output file's name: ``<new SOP Instance UID>.dcm``."""
        return self.path.name

    def __repr__(self) -> str:
        return f"DeidResult({self.sop_instance_uid}, {self.modality}, {self.size} bytes)"


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _has_pixels(header: Header) -> bool:
    return header.pixels is not None or any(e.tag in PIXEL_TAGS for e in header.elements)


def _cs(value: str) -> bytes:
    return _even(value.encode("ascii"), b" ")


def _pixel_header(elements: list[Element], job: PixelJob, input_size: int) -> list[Element]:
    """The output header of a cleaned object: pixel elements dropped (written anew), Burned In
    Annotation NO, the output photometric interpretation, lossy compression history kept."""
    from .pixels.codecs import LOSSY_METHOD, NATIVE

    out = {e.tag: e for e in elements if e.tag not in PIXEL_TAGS}
    out[0x00280301] = Element(0x00280301, "CS", _cs("NO"))
    out[0x00280004] = Element(0x00280004, "CS", _cs(job.photometric))
    if job.layout.colour:
        planar = job.layout.planar if job.output_syntax in NATIVE else 0
        out[0x00280006] = Element(0x00280006, "US", planar.to_bytes(2, "little"))
    if job.lossy_input:
        # PS3.3 C.7.6.1.1.5: once lossy, always "01"; method and ratio keep the history. The
        # cleaned frames are re-encoded losslessly, which adds nothing to it.
        out[0x00282110] = Element(0x00282110, "CS", _cs("01"))
        method = LOSSY_METHOD.get(job.input_syntax)
        if method is not None and 0x00282114 not in out:
            out[0x00282114] = Element(0x00282114, "CS", _cs(method))
            if 0x00282112 not in out:
                layout = job.layout
                raw_size = layout.frames * layout.frame_bytes
                ratio = f"{raw_size / max(input_size, 1):.2f}"[:16]
                out[0x00282112] = Element(0x00282112, "DS", _even(ratio.encode(), b" "))
    return sorted(out.values(), key=lambda e: e.tag)


class Deidentifier:
    """De-identifies files and datasets with one site secret and one set of options.

    Picklable (only the secret, options and station name travel), so it can be handed to
    ``ProcessPoolExecutor`` workers.

    Parameters
    ----------
    secret
        The site secret (at least 16 bytes); see :func:`load_or_create_secret`.
    options
        Annex E options and the burned-in policy; default :class:`DeidOptions`.
    station_name
        Written into StationName (SH, at most 16 characters) when given.

    Raises
    ------
    TypeError
        ``options`` is not a :class:`DeidOptions`.
    ValueError
        ``secret`` is shorter than 16 bytes, or ``station_name`` is not a valid SH value.

    Examples
    --------
    >>> from gateway_agent import Deidentifier, load_or_create_secret
    >>> deid = Deidentifier(load_or_create_secret("site.key"))  # doctest: +SKIP
    >>> deid.deidentify_file("in/IMG0001.dcm", "out/").path  # doctest: +SKIP
    PosixPath('out/2.25.1234....dcm')
    """

    def __init__(
        self, secret: bytes, options: DeidOptions | None = None, *, station_name: str | None = None
    ) -> None:
        if options is not None and not isinstance(options, DeidOptions):
            raise TypeError('Argument "options" must be a DeidOptions.')
        if station_name is not None and (
            len(station_name) > 16
            or not station_name.isascii()
            or "\\" in station_name
            or not station_name.isprintable()
        ):
            raise ValueError('Argument "station_name" must be SH: at most 16 ASCII characters.')
        self._secret = bytes(secret)
        self.options = options or DeidOptions()
        self.station_name = station_name
        self._engine = Engine(Keys(self._secret), profile_for(self.options), station_name)

    def __getstate__(self) -> tuple[bytes, DeidOptions, str | None]:
        return self._secret, self.options, self.station_name

    def __setstate__(self, state: tuple[bytes, DeidOptions, str | None]) -> None:
        self.__init__(state[0], state[1], station_name=state[2])  # type: ignore[misc]

    def with_burned_in(self, policy: str) -> Deidentifier:
        """The same secret, options and station name with another burned-in ``policy``."""
        values = {name: getattr(self.options, name) for name in DeidOptions.FIELDS}
        values["burned_in"] = policy
        return Deidentifier(self._secret, DeidOptions(**values), station_name=self.station_name)

    def __repr__(self) -> str:  # never the secret
        return f"Deidentifier(options={self.options!r}, station_name={self.station_name!r})"

    # -- files ------------------------------------------------------------------------------
    def deidentify_file(
        self,
        src: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        sync_folder: bool = True,
    ) -> DeidResult:
        """De-identify one part-10 file into ``out_dir/<new SOP Instance UID>.dcm``.

        Only the header is parsed; the pixel data element is copied byte for byte (deflated
        files are inflated, rewritten and deflated again). The output is written to a temp
        file in ``out_dir``, fsynced (unless ``fsync=False``), renamed, and the folder fsynced.
        Same input and secret give a byte-identical file at the same path.

        Parameters
        ----------
        src
            The input file.
        out_dir
            The output folder (created when missing).
        fsync
            Make the output durable before returning (the agent needs it; a batch may not).
        sync_folder
            With ``fsync``, also fsync ``out_dir`` after the rename. ``False``: the file's bytes
            are durable on return, its name only once the caller fsyncs ``out_dir`` (the agent
            does so once for each group of files it commits to its outbox).

        Returns
        -------
        DeidResult
            The output's path, UIDs, size and audit record.

        Raises
        ------
        DeidError
            The input cannot be de-identified safely; ``reason`` is one of ``not_dicom``,
            ``empty_file``, ``truncated``, ``unreadable``, ``unreadable_header``,
            ``no_sop_instance_uid``, ``missing_uid``, ``unsupported_transfer_syntax``,
            ``burned_in_annotation``,
            ``dicomdir``, ``internal_error``. Messages never carry values from the input.
        OSError
            Writing the output failed (e.g. disk full): not the input's fault.
        """
        with SourceFile(src) as source:
            job = None
            try:
                header = source.read_header()
                meta_class = (
                    next((e.raw for e in header.meta if e.tag == 0x00020002), b"")
                    .decode("latin-1")
                    .strip("\0 ")
                )
                if meta_class == _DICOMDIR_CLASS:
                    raise DeidError("dicomdir", "DICOMDIR is a media index, not an instance")
                outcome = self._engine.run(header.elements)
                for key in ("study_instance_uid", "series_instance_uid", "sop_class_uid"):
                    # Validate early: an archive refuses such an instance, so it would only die
                    # in the outbox later; refused here, the original goes to quarantine.
                    if not outcome.uids[key]:
                        raise DeidError("missing_uid", f"no {key}")
                enc = header.encoding
                transfer_syntax = header.transfer_syntax
                if outcome.clean_pixels and _has_pixels(header):
                    job = self._pixel_job(source, header, outcome)
                    transfer_syntax = job.output_syntax
                body = encode_dataset(outcome.elements, enc.implicit, enc.little)
                if enc.deflated and job is None:
                    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                    body = _even(packer.compress(body) + packer.flush(), b"\0")
                meta = self._file_meta(outcome, transfer_syntax, meta_class)
            except DeidError:
                raise
            except (MemoryError, RecursionError, ValueError, LookupError, TypeError) as exc:
                raise DeidError("internal_error", type(exc).__name__) from None
            uids = outcome.uids
            path = Path(out_dir, f"{uids['sop_instance_uid']}.dcm")
            pixels = (source.fd, header.pixels) if header.pixels is not None else None
            write = functools.partial(
                write_part10,
                path,
                meta,
                body,
                pixels=pixels,
                pixel_writer=job.write_element if job is not None else None,
                fsync=fsync,
                sync_folder=sync_folder,
            )
            try:
                try:
                    size = write()
                except (FileNotFoundError, NotADirectoryError):
                    # The folder is missing (first file) or not a folder: create it, or raise as
                    # makedirs does. Trying first saves two system calls on every other file.
                    Path(out_dir).mkdir(parents=True, exist_ok=True)
                    size = write()
            finally:
                if job is not None:
                    job.close()
        audit = self._engine.audit(outcome, header.transfer_syntax)
        audit["trailing_elements_dropped"] = header.trailing_dropped
        if job is not None:
            audit["pixels"] = job.audit_record()
        return DeidResult(
            path=path,
            sop_instance_uid=uids["sop_instance_uid"],
            sop_class_uid=uids["sop_class_uid"],
            study_instance_uid=uids["study_instance_uid"],
            series_instance_uid=uids["series_instance_uid"],
            modality=outcome.modality,
            size=size,
            audit=audit,
            scanner=outcome.scanner,
        )

    def _pixel_job(self, source: SourceFile, header: Header, outcome: Outcome) -> PixelJob:
        """Prepare Clean Pixel Data for an object at risk; edit its output header to match.

        Raises ``DeidError`` (``burned_in_annotation`` when the engine is not installed: the
        quarantine policy applies; ``burned_in_undecodable`` when the pixels cannot be read).
        """
        from .pixels.clean import PixelJob, undecodable_on_error
        from .pixels.identity import identity_tokens
        from .pixels.signatures import match_signature

        if any(e.tag in (0x7FE00008, 0x7FE00009) for e in header.elements):
            raise DeidError("burned_in_undecodable", "float pixel data")
        identity = identity_tokens(header.elements, outcome.codec, self.options)
        signature = match_signature(header.elements, header.meta, outcome.codec)
        fileobj = os.fdopen(os.dup(source.fd), "rb")
        try:
            with undecodable_on_error():
                job = PixelJob(
                    fileobj,
                    header.transfer_syntax,
                    identity,
                    signature,
                    implicit=header.encoding.implicit,
                )
        except BaseException:
            fileobj.close()
            raise
        outcome.elements = _pixel_header(outcome.elements, job, source.size)
        return job

    @staticmethod
    def _file_meta(outcome: Outcome, transfer_syntax: str, meta_class: str) -> list[Element]:
        sop_class = outcome.uids["sop_class_uid"] or meta_class
        return [
            Element(0x00020001, "OB", b"\x00\x01"),
            Element(0x00020002, "UI", _even(sop_class.encode(), b"\0")),
            Element(0x00020003, "UI", _even(outcome.uids["sop_instance_uid"].encode(), b"\0")),
            Element(0x00020010, "UI", _even(transfer_syntax.encode(), b"\0")),
            Element(0x00020012, "UI", _even(IMPLEMENTATION_CLASS_UID.encode(), b"\0")),
            Element(0x00020013, "SH", _even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
        ]

    # -- pydicom datasets -------------------------------------------------------------------
    def deidentify_dataset(self, ds: Dataset) -> dict[str, Any]:
        """De-identify a pydicom Dataset in place and return the audit record.

        The dataset is encoded (explicit VR little endian), run through the same engine as
        files, and decoded back into ``ds``; ``ds.file_meta`` and ``ds.preamble`` follow.

        A Dataset built in memory may lack some UIDs: the SOP Instance and SOP Class UID are
        then taken from ``ds.file_meta`` (Media Storage SOP Instance/Class UID), and a missing
        Study or Series Instance UID is generated from the patient and study attributes
        (then replaced by its keyed UID, like any UID): slices of one study built alike come
        out in one study and one series, the same way every time with the same secret.

        Parameters
        ----------
        ds
            The dataset to de-identify; it is changed in place.

        Returns
        -------
        dict[str, Any]
            The audit record: counts per action, profile edition and options, output UIDs.
            It never carries a value of the input.

        Raises
        ------
        TypeError
            ``ds`` is not a pydicom Dataset.
        DeidError
            The dataset cannot be encoded (``unreadable_header``), has no SOP Instance UID
            anywhere (``no_sop_instance_uid``), or is refused by the burned-in policy
            (``burned_in_annotation``).
        """
        from pydicom.dataset import Dataset as _Dataset
        from pydicom.filebase import DicomBytesIO
        from pydicom.filereader import read_dataset
        from pydicom.filewriter import correct_ambiguous_vr, write_dataset

        if not isinstance(ds, _Dataset):
            raise TypeError('Argument "ds" must be a pydicom Dataset.')
        buf = DicomBytesIO()
        buf.is_little_endian = True
        buf.is_implicit_VR = False
        try:
            correct_ambiguous_vr(ds, True)
            write_dataset(buf, ds)
        except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
            raise DeidError(
                "unreadable_header", f"cannot encode dataset ({type(exc).__name__})"
            ) from None
        data = buf.getvalue()
        elements, _ = parse_dataset(data, len(data), 0, False, True)
        elements = _complete_uids(elements, getattr(ds, "file_meta", None))
        outcome = self._engine.run(elements)
        if outcome.clean_pixels and any(e.tag in PIXEL_TAGS for e in elements):
            # Clean Pixel Data streams frames from a file; a Dataset at risk is held back as
            # under the quarantine policy rather than returned with its pixels untouched.
            raise DeidError(
                "burned_in_annotation", "Clean Pixel Data runs on files: use deidentify_file"
            )
        encoded = encode_dataset(outcome.elements, False, True)
        new = read_dataset(io.BytesIO(encoded), is_implicit_VR=False, is_little_endian=True)
        ds.clear()
        for elem in new:
            ds.add(elem)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            meta.MediaStorageSOPInstanceUID = outcome.uids["sop_instance_uid"]
            for tag in (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102):
                if tag in meta:
                    del meta[tag]
        if getattr(ds, "preamble", None) is not None:
            ds.preamble = b"\0" * 128
        audit = self._engine.audit(outcome, "")
        audit.pop("transfer_syntax")
        return audit


def _uid_element(tag: int, uid: str) -> Element:
    return Element(tag, "UI", _even(uid.encode("ascii"), b"\0"))


def _derived_uid(purpose: str, parts: list[bytes]) -> str:
    digest = hashlib.sha256(purpose.encode() + b"|" + b"|".join(parts)).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


#: What identifies a study built in memory without a Study Instance UID: Patient ID, Patient's
#: Name, Birth Date, Study Date, Study Time, Study ID, Accession Number.
_STUDY_KEY = (0x00100020, 0x00100010, 0x00100030, 0x00080020, 0x00080030, 0x00200010, 0x00080050)
#: ... and a series within it: Modality, Series Number, Date, Time, Description.
_SERIES_KEY = (0x00080060, 0x00200011, 0x00080021, 0x00080031, 0x0008103E)


def _complete_uids(elements: list[Element], meta: Any) -> list[Element]:
    """Add the UIDs an in-memory Dataset may lack (see :meth:`Deidentifier.deidentify_dataset`)."""
    top = {el.tag: el for el in elements}
    added: list[Element] = []
    for tag, meta_keyword in (
        (0x00080016, "MediaStorageSOPClassUID"),
        (0x00080018, "MediaStorageSOPInstanceUID"),
    ):
        uid = getattr(meta, meta_keyword, None) if meta is not None else None
        if tag not in top and uid:
            added.append(_uid_element(tag, str(uid)))

    def raw(tag: int) -> bytes:
        el = top.get(tag)
        return el.raw.rstrip(b"\0 ") if el is not None else b""

    study = raw(0x0020000D) or _derived_uid("study", [raw(t) for t in _STUDY_KEY]).encode()
    if 0x0020000D not in top:
        added.append(_uid_element(0x0020000D, study.decode("ascii")))
    if 0x0020000E not in top:
        series_key = [study, *(raw(t) for t in _SERIES_KEY)]
        added.append(_uid_element(0x0020000E, _derived_uid("series", series_key)))
    if not added:
        return elements
    return sorted(elements + added, key=lambda el: el.tag)


#: The key of :func:`anonymize_dataset` calls without ``secret``: random, made on first use and
#: kept for the life of the process.
_PROCESS_SECRET: bytes | None = None


def _process_secret() -> bytes:
    global _PROCESS_SECRET
    if _PROCESS_SECRET is None:
        _PROCESS_SECRET = os.urandom(32)
    return _PROCESS_SECRET


def anonymize_dataset(
    ds: Dataset, station_name: str = "EDGE01", *, secret: bytes | None = None, **options: Any
) -> Dataset:
    """De-identify a pydicom Dataset in place (PS3.15 Annex E basic profile) and return it.

    Afterwards ``ds.PatientIdentityRemoved == "YES"``, ``ds.StationName == station_name`` and
    ``ds.DeidentificationMethod`` names the profile edition and options. UIDs, patient
    pseudonyms and the per-patient date shift are keyed by ``secret`` (HMAC-SHA256): the same
    input and secret always give the same output.

    Parameters
    ----------
    ds
        The dataset to de-identify; it is changed in place. One built in memory may carry its
        SOP Instance UID only in ``ds.file_meta``, and may lack Study and Series Instance UIDs
        (see :meth:`Deidentifier.deidentify_dataset`).
    station_name
        Written into StationName (SH, at most 16 characters).
    secret
        The site secret, at least 16 bytes (for example ``load_or_create_secret(path)``).
        Pass it for output that is reproducible across processes and linkable to the agent's.
        Without it, one random key made on the first call serves every call of the process:
        slices of one series stay one patient, one study and one series, and nothing links
        them to another process's output.
    **options
        :class:`DeidOptions` fields: ``retain_uids=True``, ``clean_descriptors=False``,
        ``burned_in="allow"``, ...

    Returns
    -------
    pydicom.dataset.Dataset
        ``ds`` itself, de-identified.

    Raises
    ------
    TypeError
        ``ds`` is not a Dataset, or an option name is unknown.
    ValueError
        ``secret`` is shorter than 16 bytes, ``station_name`` is not a valid SH value, or an
        option value is invalid.
    DeidError
        The dataset is refused; ``reason`` and ``detail`` say why (see
        :data:`gateway_agent.REASONS`).

    Examples
    --------
    >>> from gateway_agent import anonymize_dataset, load_or_create_secret
    >>> secret = load_or_create_secret("site-secret.key")  # doctest: +SKIP
    >>> anonymize_dataset(ds, station_name="EDGE01", secret=secret)  # doctest: +SKIP
    """
    key = secret if secret is not None else _process_secret()
    Deidentifier(
        key, DeidOptions.from_kwargs(**options), station_name=station_name
    ).deidentify_dataset(ds)
    return ds


def _tags_to_remove() -> frozenset[BaseTag]:
    from pydicom.tag import BaseTag

    out = set()
    for row in load_rows():
        tag = row.exact_tag
        if tag is not None and row.basic == "X":
            out.add(BaseTag(tag))
    return frozenset(out)


def __getattr__(name: str) -> Any:
    # TAGS_TO_REMOVE needs pydicom's BaseTag; built on first use so the CLI stays light.
    if name == "TAGS_TO_REMOVE":
        value = _tags_to_remove()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
