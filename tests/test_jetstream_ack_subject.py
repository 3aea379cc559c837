"""Where a delivered message stands in its stream, read from its ack subject (both forms)."""

from __future__ import annotations

import pytest

from caresync.router.jetstream import _position


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.CARESYNC_IN.router.1.42.40.1763980000123456789.7", (42, 1763980000123456789)),
        (
            "$JS.ACK.hub.ACCOUNTHASH.CARESYNC_IN.router.1.42.40.1763980000123456789.7.token",
            (42, 1763980000123456789),
        ),
        ("$JS.ACK.hub.ACCOUNTHASH.CARESYNC_IN.router.1.42", (42, 0)),
    ],
)
def test_stream_sequence_and_time_come_from_the_ack_subject(
    reply: str, expected: tuple[int, int]
) -> None:
    assert _position(reply) == expected
