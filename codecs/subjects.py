"""The subject taxonomy and stream names (see docs/contracts.md).

Subjects, with the default prefix ``cs``::

    cs.in.<kind>.<entity>       commands from source systems (canonical envelopes)
    cs.int.<kind>.<entity>      internal fan-out: commands one actor sends to another
    cs.out.<system>.<key>       effects for downstream systems (billing, erp, supply)
    cs.raw.<format>[.<source>]  raw source messages (hl7, fhir) for the router's ingest stage
    cs.dlq.<code>               dead letters: the raw bytes of rejected inputs
    cs.ctl.<op>                 control requests (health, status); request/reply, not stored
    cs.refdata.load             reference-data sets, one message per load (its seq is its version)

Entity ids are free text (``HOSP:A123``, ``OR 2.1``), subject tokens are not: ids are put in
subjects with a reversible percent-encoding of the characters NATS reserves.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import msgspec

from caresync.codecs.errors import SubjectError

MAX_ID_LENGTH = 256

# Characters that cannot appear raw in a NATS subject token, plus '%' itself so that the
# encoding stays reversible.  Everything else (including ':' and non-ASCII) passes through.
_RESERVED = frozenset(".*>% \t\r\n\f\v\x00/")
_HEX = frozenset("0123456789ABCDEF")
_NEEDS_ESCAPE = re.compile(r"[.*>% \t\r\n\f\v/\x00-\x1f\x7f]")
"""One search instead of a per-character test: most ids need no escape (hot path)."""


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a, the hash of nats-server's ``partition()`` subject transform."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=1 << 16)
def _partition(kind: str, entity: str, partitions: int) -> int:
    return fnv1a_32(f"{kind}{encode_token(entity)}".encode()) % partitions


@functools.lru_cache(maxsize=16)
def _tokens(prefix: str) -> list[str]:
    """The tokens of a subject prefix (shared: never modified)."""
    return prefix.split(".")


def encode_token(value: str) -> str:
    """Encode a free-text id as one subject token (reversible, see :func:`decode_token`)."""
    if not value:
        raise SubjectError("empty id cannot be a subject token", code="bad_id")
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    out: list[str] = []
    for ch in value:
        if ch in _RESERVED or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.extend(f"%{b:02X}" for b in ch.encode())
        else:
            out.append(ch)
    return "".join(out)


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`; raises SubjectError on a malformed or non-canonical escape."""
    if "%" not in token:
        return token
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            pair = token[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise SubjectError(f"bad escape %{pair!s} in subject token", code="bad_id")
            raw.append(int(pair, 16))
            i += 3
        else:
            raw.extend(ch.encode())
            i += 1
    try:
        value = raw.decode()
    except UnicodeDecodeError as exc:
        raise SubjectError(
            f"subject token is not UTF-8 after unescaping: {exc}", code="bad_id"
        ) from exc
    # One id, one subject: escapes of characters that need none (or lower-case hex) would put
    # the same entity on two subjects, and with partitions possibly in two partitions.
    canonical = encode_token(value)
    if canonical != token:
        raise SubjectError(
            f"subject token {token!r} is not in canonical form (expected {canonical!r})",
            code="bad_id",
        )
    return value


class EntityAddress(msgspec.Struct, frozen=True, gc=False):
    """Where a command goes: the entity kind and id, and whether it came from inside."""

    kind: str
    entity: str
    internal: bool


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds and parses subjects and stream names for one subject/stream prefix."""

    prefix: str = "cs"
    stream_prefix: str = "CARESYNC"
    partitions: int = 1

    # -- subjects ---------------------------------------------------------------------------
    def command(self, kind: str, entity: str) -> str:
        """Subject for a command from a source system."""
        return f"{self.prefix}.in.{kind}.{encode_token(entity)}"

    def internal(self, kind: str, entity: str) -> str:
        """Subject for a command one actor sends to another."""
        return f"{self.prefix}.int.{kind}.{encode_token(entity)}"

    def local_record(self, kind: str, entity: str) -> str:
        """Subject of the record of a command an actor sent to an entity of its own partition,
        applied there with its cause (kept in :attr:`local_stream`, read by no router)."""
        return f"{self.prefix}.loc.{kind}.{encode_token(entity)}"

    def downstream(self, system: str, key: str) -> str:
        """Subject for an effect addressed to a downstream system."""
        return f"{self.prefix}.out.{system}.{encode_token(key)}"

    def raw(self, fmt: str, source: str = "") -> str:
        """Subject of a raw source message (``hl7``, ``fhir``), optionally naming its source."""
        return f"{self.prefix}.raw.{fmt}" + (f".{encode_token(source)}" if source else "")

    def raw_format(self, subject: str) -> str:
        """The format token of a raw subject (``hl7`` for ``cs.raw.hl7.lab``); '' if none."""
        head = f"{self.prefix}.raw."
        return subject[len(head) :].split(".", 1)[0] if subject.startswith(head) else ""

    def dead_letter(self, code: str) -> str:
        """Subject for a dead letter with a reason code."""
        return f"{self.prefix}.dlq.{code}"

    def control(self, op: str) -> str:
        """Subject of a control request (health, status)."""
        return f"{self.prefix}.ctl.{op}"

    def group_control(self, group: int, op: str) -> str:
        """Subject of a control request to one router process of a multi-process router
        (``cs.ctl.group.<k>.<op>``: not matched by the shared ``cs.ctl.*`` subscription)."""
        return f"{self.prefix}.ctl.group.{group}.{op}"

    def parse_address(self, subject: str) -> EntityAddress:
        """Entity kind and id of an input or internal subject; raises SubjectError."""
        tokens = subject.split(".")
        head = _tokens(self.prefix)
        offset = len(head)
        if tokens[:offset] != head:
            raise SubjectError(f"subject {subject!r} is outside the prefix {self.prefix!r}")
        rest = tokens[offset:]
        # A partitioned deployment maps cs.in.K.I to cs.part.N.in.K.I (see stream_subjects).
        if len(rest) == 5 and rest[0] == "part":
            rest = rest[2:]
        if len(rest) != 3 or rest[0] not in ("in", "int") or not rest[1] or not rest[2]:
            raise SubjectError(
                f"subject {subject!r} is not {self.prefix}.in.<kind>.<entity> "
                f"or {self.prefix}.int.<kind>.<entity>"
            )
        return EntityAddress(kind=rest[1], entity=decode_token(rest[2]), internal=rest[0] == "int")

    # -- streams ----------------------------------------------------------------------------
    def input_stream(self, partition: int) -> str:
        """Name of the input stream of one partition (inputs and internal fan-out together)."""
        if self.partitions == 1:
            return f"{self.stream_prefix}_IN"
        return f"{self.stream_prefix}_IN_P{partition}"

    def input_streams(self) -> list[str]:
        """The input stream of every partition, in partition order."""
        return [self.input_stream(p) for p in range(self.partitions)]

    def input_stream_subjects(self, partition: int) -> list[str]:
        """Subjects stored by the input stream of one partition.

        Inputs and internal fan-out share one stream per partition so that replaying the
        stream in sequence order reproduces exactly the order the live router applied.
        """
        if self.partitions == 1:
            return [f"{self.prefix}.in.>", f"{self.prefix}.int.>"]
        return [f"{self.prefix}.part.{partition}.>"]

    def local_filter(self, kind: str = "") -> str:
        """Subject filter of the local records of one entity kind (of every kind if empty)."""
        return f"{self.prefix}.loc.{kind or '*'}.*"

    def parse_local(self, subject: str) -> EntityAddress:
        """Entity kind and id of a local record's subject; raises SubjectError."""
        head = f"{self.prefix}.loc."
        kind, _, token = subject[len(head) :].partition(".")
        if not subject.startswith(head) or not kind or not token or "." in token:
            raise SubjectError(f"subject {subject!r} is not {self.prefix}.loc.<kind>.<entity>")
        return EntityAddress(kind=kind, entity=decode_token(token), internal=True)

    def partition_of(self, kind: str, entity: str) -> int:
        """The partition of an entity: what the server's ``partition(n,1,2)`` mapping computes,
        FNV-1a (32 bits) of the kind and id tokens joined without a separator, modulo n."""
        if self.partitions == 1:
            return 0
        return _partition(kind, entity, self.partitions)

    def partition_mappings(self) -> dict[str, str]:
        """Server subject mappings that spread entities over partitions (empty if one)."""
        if self.partitions == 1:
            return {}
        n = self.partitions
        return {
            f"{self.prefix}.{role}.*.*": (
                f"{self.prefix}.part.{{{{partition({n},1,2)}}}}.{role}.{{{{wildcard(1)}}}}"
                f".{{{{wildcard(2)}}}}"
            )
            for role in ("in", "int")
        }

    @property
    def local_stream(self) -> str:
        """Name of the stream of records of local commands (``router/local_fanout.py``)."""
        return f"{self.stream_prefix}_LOCAL"

    @property
    def output_stream(self) -> str:
        """Name of the stream holding effects for downstream systems."""
        return f"{self.stream_prefix}_OUT"

    @property
    def raw_stream(self) -> str:
        """Name of the stream of raw source messages (HL7 v2, FHIR) awaiting decoding."""
        return f"{self.stream_prefix}_RAW"

    @property
    def dead_letter_stream(self) -> str:
        """Name of the dead-letter stream."""
        return f"{self.stream_prefix}_DLQ"

    @property
    def refdata_stream(self) -> str:
        """Name of the stream holding reference-data versions (a version is a stream seq)."""
        return f"{self.stream_prefix}_REFDATA"

    @property
    def refdata_subject(self) -> str:
        """Subject a reference-data set is published on, one message per load."""
        return f"{self.prefix}.refdata.load"

    def consumer_name(self, partition: int) -> str:
        """Durable consumer name of the router on one partition."""
        return f"router-p{partition}"
