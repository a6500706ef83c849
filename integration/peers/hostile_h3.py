#!/usr/bin/env python3
"""A hostile HTTP/3 peer with a valid client certificate, written on aioquic (not our stack).

It opens request streams that each announce a HEADERS frame of `--frame-size` bytes and trickle
it in without ever finishing it (one byte short), keeping `--streams` such streams open: a stream
the server refuses (STOP_SENDING / RESET_STREAM) is replaced by a new one, as an attacker would.
With `--connections N` it opens N connections at once (each doing the same). It runs for
`--duration` seconds and prints one JSON line: streams opened and refused, bytes sent,
connections made and refused.

  hostile_h3.py --connect HOST:PORT --ca CA --cert CERT --key KEY
                [--streams 64] [--frame-size 4194304] [--chunk 16384] [--duration 10] [--connections 1]
"""

import argparse
import asyncio
import json
import sys
import time

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StopSendingReceived, StreamReset


def varint(value):
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


class Hostile(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = set()

    def quic_event_received(self, event):
        if isinstance(event, (StopSendingReceived, StreamReset)):
            self.refused.add(event.stream_id)


async def attack(args, totals):
    host, port = args.connect.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=args.server_name)
    config.load_verify_locations(args.ca)
    config.load_cert_chain(args.cert, args.key)
    config.max_data = 1 << 24
    try:
        async with connect(host, int(port), configuration=config, create_protocol=Hostile,
                           wait_connected=True) as client:
            totals["connections"] += 1
            quic = client._quic
            control = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(control, varint(0x00) + varint(0x04) + varint(0))
            # stream id -> payload bytes still to send (one is always held back)
            open_streams = {}

            def open_one():
                stream = quic.get_next_available_stream_id()
                quic.send_stream_data(stream, varint(0x01) + varint(args.frame_size))
                open_streams[stream] = args.frame_size - 1
                totals["streams_opened"] += 1

            for _ in range(args.streams):
                open_one()
            client.transmit()
            deadline = time.monotonic() + args.duration
            while time.monotonic() < deadline:
                for stream in list(open_streams):
                    if stream in client.refused:
                        del open_streams[stream]
                        totals["streams_refused"] += 1
                        open_one()
                        continue
                    left = open_streams[stream]
                    size = min(args.chunk, left)
                    if size <= 0:
                        continue
                    try:
                        quic.send_stream_data(stream, b"\x00" * size)
                    except Exception:
                        client.refused.add(stream)
                        continue
                    open_streams[stream] = left - size
                    totals["bytes_sent"] += size
                client.transmit()
                await asyncio.sleep(args.tick)
            totals["congestion_window"] = quic._loss.congestion_window
            totals["bytes_in_flight"] = quic._loss.bytes_in_flight
            totals["smoothed_rtt_ms"] = round(quic._loss._rtt_smoothed * 1000, 3)
            # What actually left for the server (the rest is queued behind flow control).
            totals["bytes_transmitted"] += sum(
                stream.sender.highest_offset for stream in quic._streams.values()
                if stream.sender is not None and stream.stream_id % 4 == 0
            )
    except ConnectionError:
        totals["connections_refused"] += 1
    except Exception as error:  # refused handshakes surface as various errors
        totals["connections_refused"] += 1
        totals.setdefault("errors", []).append(repr(error)[:200])


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--server-name", default="locality-sidecar")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--frame-size", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--chunk", type=int, default=16 * 1024)
    parser.add_argument("--tick", type=float, default=0.01)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    totals = {"connections": 0, "connections_refused": 0, "streams_opened": 0,
              "streams_refused": 0, "bytes_sent": 0, "bytes_transmitted": 0}
    await asyncio.gather(*(attack(args, totals) for _ in range(args.connections)))
    print(json.dumps(totals), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
