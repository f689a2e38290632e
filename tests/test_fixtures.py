"""The test servers themselves: what made CI red once must not again."""

import socket

import pytest
from conftest import SeaweedS3


@pytest.mark.s3
def test_seaweed_starts_when_a_picked_port_is_taken_before_it_binds(tmp_path):
    """Ray's processes pick random ports too: one taken between the pick and weed's bind made
    weed exit at once, and every SeaweedFS test errored after a 60 s wait."""
    server = SeaweedS3(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", server.ports["p1"]))  # the volume port, as in the failed CI run
    taken.listen()
    first = dict(server.ports)
    try:
        server.start()
        assert server.ports != first
        assert server.bucket().startswith("s3://")
    finally:
        server.stop()
        taken.close()
