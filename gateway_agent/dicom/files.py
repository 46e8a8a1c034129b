"""Part-10 files: header-only reads (pixels untouched); atomic header + raw pixel writes."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator

from .._exceptions import DeidError
from .codec import (
    LONG_VRS,
    PIXEL_TAGS,
    Element,
    Encoding,
    encapsulated_end,
    encode_dataset,
    encoding_for,
    parse_dataset,
)

__all__ = [
    "FileMeta",
    "Header",
    "PixelRange",
    "SourceFile",
    "atomic_write",
    "copy_range",
    "encode_file_meta",
    "fsync_dir",
    "parse_file_meta",
    "read_file_meta",
    "write_all",
    "write_part10",
]

_U32 = struct.Struct("<I")
_META_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_COPY_CHUNK = 1 << 20


class PixelRange:
    """Where the pixel data element (tag to end of value) sits in the source file."""

    __slots__ = ("encapsulated", "end", "start")

    def __init__(self, start: int, end: int, encapsulated: bool) -> None:
        self.start = start
        self.end = end
        self.encapsulated = encapsulated

    def __repr__(self) -> str:
        return f"PixelRange({self.start}, {self.end}, encapsulated={self.encapsulated})"


class Header:
    """A parsed part-10 header: file meta, transfer syntax and the data set up to pixel data."""

    __slots__ = ("elements", "encoding", "meta", "pixels", "trailing_dropped", "transfer_syntax")

    def __init__(
        self,
        meta: list[Element],
        transfer_syntax: str,
        encoding: Encoding,
        elements: list[Element],
        pixels: PixelRange | None = None,
        trailing_dropped: bool = False,
    ) -> None:
        self.meta = meta
        self.transfer_syntax = transfer_syntax
        self.encoding = encoding
        self.elements = elements
        self.pixels = pixels
        self.trailing_dropped = trailing_dropped


class SourceFile:
    """An input file opened for a header-only read; use as a context manager.

    The first 64 KiB are read with one ``pread`` (a CT header is a few KiB); the file is mapped
    only when the header runs past them, for deflated data sets and for encapsulated pixel
    data (whose fragments are walked). Mapping every file cost a ``mmap``/``munmap`` pair and
    page faults per input.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except IsADirectoryError:
            raise DeidError("not_dicom", "is a directory") from None
        except OSError as exc:
            raise DeidError("unreadable", type(exc).__name__) from None
        self.map: mmap.mmap | None = None
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size == 0:
                raise DeidError("empty_file")
            self.head = os.pread(self.fd, min(self.size, _HEAD_READ), 0)
        except OSError as exc:
            os.close(self.fd)
            raise DeidError("unreadable", type(exc).__name__) from None
        except BaseException:
            os.close(self.fd)
            raise
        if len(self.head) < min(self.size, _HEAD_READ):  # shrank since fstat
            os.close(self.fd)
            raise DeidError("truncated", "file shrank while being read")

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)
        self.fd = -1

    def whole(self) -> bytes | mmap.mmap:
        """The whole file: the bytes already read, or a read-only mapping made on first use."""
        if len(self.head) == self.size:
            return self.head
        if self.map is None:
            try:
                self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise DeidError("unreadable", type(exc).__name__) from None
        return self.map

    def read_header(self) -> Header:
        """Parse preamble, file meta and the data set up to (not into) the pixel data.

        Deflated data sets are inflated in memory and parsed whole (pixel data included).
        """
        if len(self.head) < self.size:
            try:
                header = self._parse(self.head, partial=True)
            except DeidError as exc:
                if exc.reason != "truncated":
                    raise
                header = None  # the header runs past the first read: parse the whole file
            if header is not None:
                return header
        header = self._parse(self.whole(), partial=False)
        assert header is not None
        return header

    def _parse(self, buf: bytes | mmap.mmap, *, partial: bool) -> Header | None:
        """The header from ``buf`` (the whole file, or only its start when ``partial``).

        ``None`` (or a "truncated" error) when ``partial`` and the start is not enough.
        """
        size = len(buf)
        if size < 132 or buf[128:132] != b"DICM":  # a partial read is 64 KiB: never too short
            raise DeidError("not_dicom", "no DICM prefix")
        meta, pos = _read_meta(buf, size)
        ts_raw = next((e.raw for e in meta if e.tag == 0x00020010), b"")
        transfer_syntax = ts_raw.decode("latin-1").strip("\0 ")
        if not transfer_syntax:
            raise DeidError("unsupported_transfer_syntax", "no transfer syntax in file meta")
        enc = encoding_for(transfer_syntax)
        if enc.deflated:
            if partial:
                return None
            try:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(buf[pos:size])
            except zlib.error:
                raise DeidError("unreadable_header", "deflated data set is corrupt") from None
            if not inflater.eof:
                raise DeidError("truncated", "deflated stream ends early")
            elements, _ = parse_dataset(data, len(data), 0, False, True)
            if not any(e.tag in PIXEL_TAGS for e in elements):
                _refuse_image_without_pixels(elements)
            return Header(meta, transfer_syntax, enc, elements)
        elements, ppos = parse_dataset(
            buf, size, pos, enc.implicit, enc.little, stop_at_pixels=True
        )
        if ppos + 12 > size and partial:
            return None  # the pixel data element's header is past the first read
        if ppos >= size:
            _refuse_image_without_pixels(elements)
            return Header(meta, transfer_syntax, enc, elements)
        pixels = self._pixel_range(buf, ppos, enc)
        return Header(
            meta, transfer_syntax, enc, elements, pixels, trailing_dropped=pixels.end < self.size
        )

    def _pixel_range(self, buf: bytes | mmap.mmap, pos: int, enc: Encoding) -> PixelRange:
        """Where the pixel data element at ``pos`` ends, checked against the file's size."""
        size = len(buf)
        o = "<" if enc.little else ">"
        if pos + 8 > size:
            raise DeidError("truncated", "file ends inside the pixel data header")
        if enc.implicit:
            (length,) = struct.unpack_from(o + "I", buf, pos + 4)
            vpos = pos + 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"):
                if pos + 12 > size:
                    raise DeidError("truncated", "file ends inside the pixel data header")
                (length,) = struct.unpack_from(o + "I", buf, pos + 8)
                vpos = pos + 12
            else:
                raise DeidError("unreadable_header", "pixel data has an invalid VR")
        if length == 0xFFFFFFFF:
            end = encapsulated_end(self.whole(), self.size, vpos, enc.little)
            return PixelRange(pos, end, True)
        end = vpos + length
        if end > self.size:
            raise DeidError("truncated", "pixel data runs past the end of the file")
        return PixelRange(pos, end, False)


_HEAD_READ = 64 << 10


def _refuse_image_without_pixels(elements: list[Element]) -> None:
    """A data set with an Image Pixel module (Rows) but no pixel data is a half-copied file.

    Its header can end cleanly at an element boundary, so only this tells it from a whole one;
    uploading it would store a pixel-less instance under the real SOP Instance UID.
    """
    if any(e.tag == 0x00280010 for e in elements):
        raise DeidError("truncated", "image attributes but no pixel data (file cut short?)")


def _read_meta(buf: bytes | mmap.mmap, size: int) -> tuple[list[Element], int]:
    pos = 132
    meta: list[Element] = []
    head = _META_HEAD.unpack_from
    while pos + 8 <= size:
        group, elem, vrb, length = head(buf, pos)
        if group != 2:
            break
        vr = vrb.decode("latin-1")
        if vr in LONG_VRS:
            if pos + 12 > size:
                raise DeidError("truncated", "file meta ends early")
            (length,) = _U32.unpack_from(buf, pos + 8)
            vpos = pos + 12
        elif vr.isalpha() and vr.isupper():
            vpos = pos + 8
        else:
            raise DeidError("unreadable_header", "file meta is not explicit VR")
        if vpos + length > size or length == 0xFFFFFFFF:
            raise DeidError("truncated", "file meta ends early")
        meta.append(Element(group << 16 | elem, vr, bytes(buf[vpos : vpos + length])))
        pos = vpos + length
    if not meta:
        raise DeidError("unreadable_header", "no file meta information")
    return meta, pos


#: Bytes read for :func:`read_file_meta`: a file meta group is a few hundred bytes.
_META_READ = 64 << 10


class FileMeta:
    """What a sender needs of a part-10 file: the meta group's UIDs, where the data set starts."""

    __slots__ = ("data_offset", "sop_class_uid", "sop_instance_uid", "transfer_syntax")

    def __init__(
        self, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, data_offset: int
    ) -> None:
        self.transfer_syntax = transfer_syntax
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.data_offset = data_offset

    def __repr__(self) -> str:
        return f"FileMeta({self.transfer_syntax}, {self.sop_class_uid}, offset={self.data_offset})"


def read_file_meta(path: str | os.PathLike[str]) -> FileMeta:
    """The file meta information of a part-10 file, from one read of its first bytes.

    Raises ``OSError`` (``FileNotFoundError`` for a missing file) and ``ValueError`` as
    :func:`parse_file_meta` does.
    """
    with open(path, "rb") as fh:
        return parse_file_meta(fh.read(_META_READ))


def parse_file_meta(head: bytes) -> FileMeta:
    """The file meta information from the first bytes of a part-10 file (64 KiB are plenty).

    Raises ``ValueError`` when they are not part 10 or have no Transfer Syntax UID. The SOP
    Class and Instance UIDs are ``""`` when the meta group lacks them.
    """
    size = min(len(head), _META_READ)
    if size < 140 or head[128:132] != b"DICM":
        raise ValueError("not a part-10 file")
    try:
        meta, end = _read_meta(head, size)
    except DeidError as exc:
        raise ValueError(f"file meta unreadable: {exc.reason}") from None
    if end + 8 > size == _META_READ:
        raise ValueError("file meta unreadable: longer than 64 KiB")
    uids = {e.tag: e.raw.rstrip(b"\0 ").decode("ascii", "replace") for e in meta}
    syntax = uids.get(0x00020010, "")
    if not syntax:
        raise ValueError("no transfer syntax in the file meta")
    return FileMeta(syntax, uids.get(0x00020002, ""), uids.get(0x00020003, ""), end)


def encode_file_meta(elements: list[Element]) -> bytes:
    """Encode group 0002 (explicit VR LE) with a correct File Meta Information Group Length."""
    body = encode_dataset(
        sorted((e for e in elements if e.tag != 0x00020000), key=_tag), False, True
    )
    return encode_dataset([Element(0x00020000, "UL", _U32.pack(len(body)))], False, True) + body


def _tag(e: Element) -> int:
    return e.tag


def copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Copy ``src[start:end]`` to the current position of ``dst``, in chunks of 1 MiB.

    ``pread`` into a reused buffer and ``write``: on ext4 this costs less CPU than
    ``copy_file_range`` or ``sendfile`` (``benchmarks/bench_copy.py``). Memory stays at one
    buffer per concurrent caller.
    """
    offset = start
    remaining = end - start
    try:
        buf = _BUFFERS.pop()  # list.pop/append are atomic: threads never share a buffer
    except IndexError:
        buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    try:
        while remaining > 0:
            n = os.preadv(src_fd, [view[: min(remaining, _COPY_CHUNK)]], offset)
            if n <= 0:
                raise DeidError("truncated", "source file shrank while copying pixel data")
            write_all(dst_fd, view[:n])
            offset += n
            remaining -= n
    finally:
        view.release()
        _BUFFERS.append(buf)


_BUFFERS: list[bytearray] = []


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a new file in one extent request.

    On ext4 this replaces the per-4 KiB delayed-allocation bookkeeping of the writes that follow
    (about a fifth of the copy's CPU), and a full disk fails here, before any byte is written.
    Filesystems without ``fallocate`` get glibc's emulation (still correct).
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return
        raise


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)


def _mkstemp(directory: str) -> tuple[int, str]:
    """``tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)`` without importing
    tempfile (random, shutil...: ~2 ms of start-up): O_EXCL, mode 0600, random name.

    Plain strings, not ``Path``: this runs for every file written."""
    flags = _TEMP_FLAGS
    for _ in range(100):
        name = f".tmp-{os.urandom(6).hex()}.part"
        path = os.path.join(directory, name)  # noqa: PTH118 - hot path
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")  # pragma: no cover


@contextlib.contextmanager
def _temp_in(directory: str) -> Iterator[tuple[int, str]]:
    fd, tmp_path = _mkstemp(directory)
    try:
        yield fd, tmp_path
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)  # noqa: PTH108 - hot path
        raise


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[int], int | None],
    *,
    fsync: bool = True,
    sync_folder: bool = True,
) -> int:
    """Write ``path`` through a temp file in its folder: ``write(fd)``, fsync, rename, fsync dir.

    ``write`` may return the number of bytes it wrote (saves a system call). No temp file
    survives an exception. Returns the size written. ``sync_folder=False`` leaves out the
    folder's fsync (with ``fsync``): the new name is durable only once the caller has fsynced
    the folder, which it may do once for several files.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."  # noqa: PTH120 - hot path
    with _temp_in(directory) as (fd, tmp_path):
        size = write(fd)
        if size is None:
            size = os.lseek(fd, 0, os.SEEK_CUR)
        os.fchmod(fd, 0o644)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        try:
            os.replace(tmp_path, target)  # noqa: PTH105 - hot path
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)  # noqa: PTH108 - hot path
            raise
    if fsync and sync_folder:
        fsync_dir(directory)
    return size


def write_part10(
    path: str | os.PathLike[str],
    meta: list[Element],
    body: bytes,
    *,
    pixels: tuple[int, PixelRange] | None = None,
    pixel_writer: Callable[[int], int] | None = None,
    fsync: bool = True,
    sync_folder: bool = True,
) -> int:
    """Write a part-10 file: zero preamble, ``DICM``, file meta, ``body``, then the raw pixel range.

    ``pixels`` is ``(source fd, range)``; the bytes are copied as they are. ``pixel_writer``
    instead writes new pixel data after the body (it returns the bytes it wrote; if it raises,
    no file is left behind).
    """
    head = b"\0" * 128 + b"DICM" + encode_file_meta(meta) + body

    def write(fd: int) -> int:
        if pixel_writer is not None:
            write_all(fd, head)
            return len(head) + pixel_writer(fd)
        if pixels is None:
            write_all(fd, head)
            return len(head)
        src_fd, rng = pixels
        size = len(head) + rng.end - rng.start
        _preallocate(fd, size)
        write_all(fd, head)
        copy_range(src_fd, fd, rng.start, rng.end)  # all of it, or it raises
        return size

    return atomic_write(path, write, fsync=fsync, sync_folder=sync_folder)
