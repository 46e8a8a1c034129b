"""Part-10 files: header-only reads (mmap, pixels untouched); atomic header + raw pixel writes."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .._exceptions import DeidError
from .codec import (
    LONG_VRS,
    Element,
    Encoding,
    encapsulated_end,
    encode_dataset,
    encoding_for,
    parse_dataset,
)

__all__ = [
    "Header",
    "PixelRange",
    "SourceFile",
    "atomic_write",
    "copy_range",
    "encode_file_meta",
    "fsync_dir",
    "write_part10",
]

_U32 = struct.Struct("<I")
_META_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_COPY_CHUNK = 8 << 20


@dataclass
class PixelRange:
    """Where the pixel data element (tag to end of value) sits in the source file."""

    start: int
    end: int
    encapsulated: bool


@dataclass
class Header:
    """A parsed part-10 header: file meta, transfer syntax and the data set up to pixel data."""

    meta: list[Element]
    transfer_syntax: str
    encoding: Encoding
    elements: list[Element]
    pixels: PixelRange | None = None
    trailing_dropped: bool = False
    extra: dict[str, int] = field(default_factory=dict)


class SourceFile:
    """An input file opened for a header-only read; use as a context manager."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except IsADirectoryError:
            raise DeidError("not_dicom", "is a directory") from None
        except OSError as exc:
            raise DeidError("unreadable", type(exc).__name__) from None
        self.size = os.fstat(self.fd).st_size
        self.map: mmap.mmap | None = None
        if self.size == 0:
            os.close(self.fd)
            raise DeidError("empty_file")
        try:
            self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            os.close(self.fd)
            raise DeidError("unreadable", type(exc).__name__) from None

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
            os.close(self.fd)

    def read_header(self) -> Header:
        """Parse preamble, file meta and the data set up to (not into) the pixel data.

        Deflated data sets are inflated in memory and parsed whole (pixel data included).
        """
        buf = self.map
        assert buf is not None
        size = self.size
        if size < 132 or buf[128:132] != b"DICM":
            raise DeidError("not_dicom", "no DICM prefix")
        meta, pos = _read_meta(buf, size)
        ts_raw = next((e.raw for e in meta if e.tag == 0x00020010), b"")
        transfer_syntax = ts_raw.decode("latin-1").strip("\0 ")
        if not transfer_syntax:
            raise DeidError("unsupported_transfer_syntax", "no transfer syntax in file meta")
        enc = encoding_for(transfer_syntax)
        if enc.deflated:
            try:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(buf[pos:size])
            except zlib.error:
                raise DeidError("unreadable_header", "deflated data set is corrupt") from None
            if not inflater.eof:
                raise DeidError("truncated", "deflated stream ends early")
            elements, _ = parse_dataset(data, len(data), 0, False, True)
            if not any(e.tag in _PIXEL_TAGS for e in elements):
                _refuse_image_without_pixels(elements)
            return Header(meta, transfer_syntax, enc, elements)
        elements, ppos = parse_dataset(
            buf, size, pos, enc.implicit, enc.little, stop_at_pixels=True
        )
        if ppos >= size:
            _refuse_image_without_pixels(elements)
            return Header(meta, transfer_syntax, enc, elements)
        pixels = _pixel_range(buf, size, ppos, enc)
        return Header(
            meta, transfer_syntax, enc, elements, pixels, trailing_dropped=pixels.end < size
        )


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _refuse_image_without_pixels(elements: list[Element]) -> None:
    """A data set with an Image Pixel module (Rows) but no pixel data is a half-copied file.

    Its header can end cleanly at an element boundary, so only this tells it from a whole one;
    uploading it would store a pixel-less instance under the real SOP Instance UID.
    """
    if any(e.tag == 0x00280010 for e in elements):
        raise DeidError("truncated", "image attributes but no pixel data (file cut short?)")


def _read_meta(buf: mmap.mmap, size: int) -> tuple[list[Element], int]:
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


def _pixel_range(buf: mmap.mmap, size: int, pos: int, enc: Encoding) -> PixelRange:
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
        return PixelRange(pos, encapsulated_end(buf, size, vpos, enc.little), True)
    end = vpos + length
    if end > size:
        raise DeidError("truncated", "pixel data runs past the end of the file")
    return PixelRange(pos, end, False)


def encode_file_meta(elements: list[Element]) -> bytes:
    """Encode group 0002 (explicit VR LE) with a correct File Meta Information Group Length."""
    body = encode_dataset(
        sorted((e for e in elements if e.tag != 0x00020000), key=_tag), False, True
    )
    return encode_dataset([Element(0x00020000, "UL", _U32.pack(len(body)))], False, True) + body


def _tag(e: Element) -> int:
    return e.tag


def copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Copy ``src[start:end]`` to the current position of ``dst`` in the kernel where possible."""
    offset = start
    remaining = end - start
    copy_file_range = getattr(os, "copy_file_range", None)
    while remaining > 0 and copy_file_range is not None:
        try:
            n = copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), offset)
        except OSError:
            break  # e.g. EXDEV on old kernels: fall through to sendfile/read
        if n <= 0:
            break
        offset += n
        remaining -= n
    while remaining > 0:
        try:
            n = os.sendfile(dst_fd, src_fd, offset, min(remaining, 1 << 30))
        except OSError:
            break
        if n <= 0:
            break
        offset += n
        remaining -= n
    while remaining > 0:
        chunk = os.pread(src_fd, min(remaining, _COPY_CHUNK), offset)
        if not chunk:
            raise DeidError("truncated", "source file shrank while copying pixel data")
        _write_all(dst_fd, chunk)
        offset += len(chunk)
        remaining -= len(chunk)


def _write_all(fd: int, data: bytes | memoryview) -> None:
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


def atomic_write(path: Path, write: Callable[[int], int | None], *, fsync: bool = True) -> int:
    """Write ``path`` through a temp file in its folder: ``write(fd)``, fsync, rename, fsync dir.

    ``write`` may return the number of bytes it wrote (saves a system call). No temp file
    survives an exception. Returns the size written.
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
    if fsync:
        fsync_dir(directory)
    return size


def write_part10(
    path: Path,
    meta: list[Element],
    body: bytes,
    *,
    pixels: tuple[int, PixelRange] | None = None,
    fsync: bool = True,
) -> int:
    """Write a part-10 file: zero preamble, ``DICM``, file meta, ``body``, then the raw pixel range.

    ``pixels`` is ``(source fd, range)``; the bytes are copied as they are.
    """
    head = b"\0" * 128 + b"DICM" + encode_file_meta(meta) + body

    def write(fd: int) -> int:
        _write_all(fd, head)
        if pixels is None:
            return len(head)
        src_fd, rng = pixels
        copy_range(src_fd, fd, rng.start, rng.end)  # all of it, or it raises
        return len(head) + rng.end - rng.start

    return atomic_write(path, write, fsync=fsync)
