"""An RTSP server restreaming MPEG-TS that arrives over UDP, without re-encoding (bench only).

Run by Debian's own python3 with python3-gi (PyGObject does not build from PyPI there):

    /usr/bin/python3 bench/rtsp_relay.py UDP_PORT RTSP_PORT PATH

``framebroker record NAME -o udp://127.0.0.1:UDP_PORT`` feeds it; clients play
``rtsp://127.0.0.1:RTSP_PORT/PATH``. The H.264 access units are taken out of the transport stream
and sent as RTP as they are (``tsdemux ! h264parse ! rtph264pay``): the restream a media server
such as mediamtx makes of a published stream. Listens on 127.0.0.1 only. Prints
"ready rtsp://127.0.0.1:RTSP_PORT/PATH" when it listens; SIGTERM stops it.
"""

import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    udp_port, rtsp_port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(rtsp_port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( udpsrc address=127.0.0.1 port={udp_port} caps="video/mpegts,systemstream=(boolean)true" '
        "! tsdemux latency=0 ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory(f"/{path}", factory)
    if server.attach(None) == 0:
        print("could not listen", flush=True)
        return 1
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    GLib.timeout_add(200, lambda: True)  # let Python run signal handlers
    print(f"ready rtsp://127.0.0.1:{rtsp_port}/{path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
