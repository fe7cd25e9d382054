"""The program an ``rtsp://`` output runs in its child: MPEG-TS on stdin, published to an RTSP server.

Started by path as ``python -I rtsp_publish.py --config-fd N [--stream NAME]``, so that it imports
PyAV and the standard library only, and starts in a tenth of a second. The URL arrives on file
descriptor N, never in argv (which every local user can read in /proc/PID/cmdline): a JSON object

    {"url": "rtsp://user:password@host:8554/path",   where to publish, credentials and all
     "title": "cam0 encoder=libx264",                 the session's name in the SDP
     "parent": 1234}                                  the recorder's pid: this child ends with it

It reads the H.264 stream the recorder muxes into MPEG-TS on stdin and sends it, packet by packet,
with FFmpeg's RTSP muxer: ANNOUNCE (an SDP with the stream's SPS and PPS), SETUP and RECORD over
TCP, then RTP interleaved on the same connection. ``--stream`` only names the stream for ``ps``.

It prints ``connected`` on stdout once the server has accepted the stream, ends at the end of its
input (TEARDOWN, exit 0) and on any failure prints the reason on stderr, one line that never holds
the URL, and exits 1. Why a process of its own: FFmpeg's RTSP muxer talks to the server inside
``avformat_write_header``, which PyAV calls holding the GIL; a server that accepts the connection
and never answers would freeze the recorder's every thread. Here it freezes this child, which the
recorder kills once it is late.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from typing import Any

# Start sending as soon as the stream's parameters are known: its first keyframe carries them.
PROBE_OPTIONS = {"probesize": "32768", "analyzeduration": "0"}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with(parent: int) -> None:
    """Be killed when the recorder ends, even by SIGKILL: blocked on a server that never answers,
    this child would not notice its stdin closing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        sys.exit(1)


def publish(av: Any, url: str, title: str) -> None:
    # Unbuffered: each read returns what the pipe holds, so no packet waits for a full buffer.
    with open(0, "rb", buffering=0) as stdin:
        source = av.open(stdin, "r", format="mpegts", options=PROBE_OPTIONS)
        video = source.streams.video[0]
        target = av.open(url, "w", format="rtsp", container_options={"rtsp_transport": "tcp"})
        target.metadata["title"] = title
        # The stream as the source describes it (SPS and PPS as extradata), copied without a codec.
        if hasattr(target, "add_stream_from_template"):  # PyAV 14 and later
            stream = target.add_stream_from_template(video)
        else:  # PyAV 12 and 13 (Python 3.8)
            stream = target.add_stream(template=video)
        announced = False
        for packet in source.demux(video):
            if packet.dts is None:  # the empty packet that ends a demuxed stream
                continue
            packet.stream = stream
            target.mux(packet)  # the first one connects, announces and starts recording
            if not announced:
                announced = True
                print("connected", flush=True)
        target.close()
        source.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config-fd", type=int, required=True, metavar="N")
    parser.add_argument("--stream", metavar="NAME", help="the stream published (for ps only)")
    args = parser.parse_args()
    with os.fdopen(args.config_fd, "rb") as source:
        config = json.loads(source.read())
    if "parent" in config:
        end_with(config["parent"])
    import av

    try:
        publish(av, config["url"], config.get("title", ""))
    except (OSError, av.error.FFmpegError) as exc:
        # FFmpeg's message names the URL: only its reason (401 Unauthorized, Connection refused).
        print(getattr(exc, "strerror", None) or type(exc).__name__, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
