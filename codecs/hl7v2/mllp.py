"""An incremental MLLP reader for a TCP server: bytes in as they arrive, frames out.

Fed the same bytes in any chunking, it returns the same frames as ``split_messages`` (the
frame left open at the end of the stream comes from ``close``).  Memory stays bounded: a frame
over ``max_frame_bytes`` is reported as an error frame holding its first ``max_frame_bytes``
bytes and the rest of it is skipped up to its end.
"""

from __future__ import annotations

import re

from caresync.codecs.hl7v2.framing import (
    CR,
    START_BLOCK,
    Frame,
    cut_off,
    frame_content,
    no_end,
    outside_frames,
    too_long,
)

_FRAMING = re.compile(rb"[\x0b\x1c]")


class MllpReader:
    """Reassembles MLLP frames from a byte stream fed in chunks of any size."""

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._base = 0
        """Stream offset of the first byte of the next chunk."""
        self._start = 0
        """Stream offset of the current frame's 0x0B, or of the first byte outside a frame."""
        self._inside = False
        self._skipping = False
        """The current frame (or junk) went over the limit and was reported: drop the rest."""
        self._after_end = False
        """The last byte was 0x1C: a CR that follows belongs to the frame end."""

    def feed(self, chunk: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the frames completed by them."""
        out: list[Frame] = []
        pos, size = 0, len(chunk)
        if self._after_end and size:
            self._after_end = False
            if chunk[0] == CR:
                pos = 1
        while pos < size:
            if not self._inside:
                pos = self._read_outside(chunk, pos, out)
            else:
                pos = self._read_inside(chunk, pos, out)
        self._base += size
        return out

    def close(self) -> list[Frame]:
        """The end of the stream: a frame still open (or trailing junk) as an error frame."""
        out: list[Frame] = []
        if self._inside and not self._skipping:
            out.append(Frame(bytes(self._buf), self._start + 1, no_end(self._start)))
        elif not self._inside and not self._skipping:
            out.extend(outside_frames(bytes(self._buf), self._start))
        self._buf.clear()
        self._inside = self._skipping = self._after_end = False
        return out

    def _read_outside(self, chunk: bytes, pos: int, out: list[Frame]) -> int:
        begin = chunk.find(b"\x0b", pos)
        stop = len(chunk) if begin < 0 else begin
        if stop > pos and not self._skipping:
            if not self._buf:
                self._start = self._base + pos
            self._buf += chunk[pos:stop]
            if len(self._buf) > self._max:
                junk = outside_frames(bytes(self._buf[: self._max]), self._start)
                out.extend(junk)
                self._skipping = bool(junk)  # report once, drop the rest up to the next frame
                self._buf.clear()
        if begin < 0:
            return len(chunk)
        if not self._skipping:
            out.extend(outside_frames(bytes(self._buf), self._start))
        self._open(self._base + begin)
        return begin + 1

    def _read_inside(self, chunk: bytes, pos: int, out: list[Frame]) -> int:
        found = _FRAMING.search(chunk, pos)
        stop = found.start() if found else len(chunk)
        if not self._skipping:
            self._buf += chunk[pos:stop]
            if len(self._buf) > self._max:
                out.append(
                    Frame(
                        bytes(self._buf[: self._max]),
                        self._start + 1,
                        too_long(self._start, self._max),
                    )
                )
                self._buf.clear()
                self._skipping = True
        if found is None:
            return len(chunk)
        if chunk[stop] == START_BLOCK:
            if not self._skipping:
                reason = cut_off(self._start, self._base + stop)
                out.append(Frame(bytes(self._buf), self._start + 1, reason))
            self._open(self._base + stop)
            return stop + 1
        if not self._skipping:
            out.extend(frame_content(bytes(self._buf), self._start + 1, self._start))
        self._inside = self._skipping = False
        self._buf.clear()
        if stop + 1 < len(chunk):
            return stop + 2 if chunk[stop + 1] == CR else stop + 1
        self._after_end = True
        return stop + 1

    def _open(self, start: int) -> None:
        self._buf.clear()
        self._start = start
        self._inside = True
        self._skipping = False
