#!/usr/bin/env python3
"""A serving peer that never says it restores `te: trailers` and offers only plain `h3` in the
handshake, as a sidecar of an older version does in the middle of a rollout; an HTTP/3 server on
aioquic (not our stack).

It answers every request as a gRPC server would (200, `application/grpc`, one empty message,
`grpc-status: 0` in trailers) and prints one JSON line per request with the `te` and
`content-type` it carried, so a test can tell whether the caller's sidecar kept sending them.
It prints `listening` once ready.

  old_sidecar_h3.py --listen HOST:PORT --cert CERT --key KEY
"""

import argparse
import asyncio
import json

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

# One gRPC message frame: not compressed, length 0 (an empty protobuf message).
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"


class OldSidecar(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)

    def quic_event_received(self, event):
        for received in self.h3.handle_event(event):
            if isinstance(received, HeadersReceived):
                headers = dict(received.headers)
                report = {
                    name: headers[name.encode()].decode() if name.encode() in headers else None
                    for name in ("te", "content-type")
                }
                print(json.dumps(report), flush=True)
            if isinstance(received, (HeadersReceived, DataReceived)) and received.stream_ended:
                self.answer(received.stream_id)

    def answer(self, stream_id):
        self.h3.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.h3.send_data(stream_id, EMPTY_MESSAGE, end_stream=False)
        self.h3.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
        self.transmit()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(args.cert, args.key)
    await serve(host, int(port), configuration=config, create_protocol=OldSidecar)
    print("listening", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
