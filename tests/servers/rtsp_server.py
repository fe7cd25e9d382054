"""A real RTSP server for tests: GStreamer's rtsp-server serving an H.264 test pattern, or, with
``--record FILE``, taking the stream a publisher sends (ANNOUNCE, RECORD) and writing it to FILE.

Runs under Debian's own python3 with python3-gi (PyGObject does not build from PyPI there):
    /usr/bin/python3 tests/servers/rtsp_server.py PORT [--user U --password P] [--width W --height H]
        [--codec h264|h265] [--audio-first] [--record FILE]
``--audio-first`` announces an audio stream (a tone, 8 kHz A-law) as the first stream of the
description, before the video, as many IP cameras do. ``--codec h265`` serves H.265 video.
``--user-env NAME`` and ``--password-env NAME`` take them from environment variables instead, off
the command line (for the test that looks at every process's command line). Prints
"ready rtsp://127.0.0.1:PORT/test" when it listens; SIGTERM stops it.

``--record FILE``: rtsp://127.0.0.1:PORT/test accepts one H.264 publisher at a time (over TCP, as
the recorder's rtsp:// output sends it), checks ``--user``/``--password`` if given, and writes
the H.264 it receives to FILE as MPEG-TS, each packet as it arrives. Prints "recording" when a
publisher's stream starts and "publisher gone" when it ends (TEARDOWN or a lost connection).
"""

import argparse
import os
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def watch_publisher(media):
    print("recording", flush=True)
    media.connect("unprepared", lambda _media: print("publisher gone", flush=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--user-env", metavar="NAME")
    parser.add_argument("--password-env", metavar="NAME")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--codec", choices=("h264", "h265"), default="h264")
    parser.add_argument("--audio-first", action="store_true")
    parser.add_argument("--record", metavar="FILE")
    args = parser.parse_args()
    if args.user_env:
        args.user = os.environ[args.user_env]
    if args.password_env:
        args.password = os.environ[args.password_env]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    # Streams are announced in the order of their payloaders' names: pay0 first.
    video, audio = ("pay1", "pay0") if args.audio_first else ("pay0", "pay1")
    encoder = {
        "h264": f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} ! rtph264pay",
        "h265": f"x265enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} ! rtph265pay",
    }[args.codec]
    launch = (
        f"videotestsrc is-live=true pattern=ball ! video/x-raw,width={args.width},height={args.height},"
        f"framerate={args.fps}/1 ! {encoder} name={video} pt=96"
    )
    if args.audio_first:
        launch += (
            " audiotestsrc is-live=true wave=sine samplesperbuffer=160 ! audio/x-raw,rate=8000,channels=1"
            f" ! alawenc ! rtppcmapay name={audio} pt=8"
        )
    if args.record:
        # The publisher's payloader feeds depay0; "unbuffered" puts each packet in the file at once.
        launch = f"rtph264depay name=depay0 ! h264parse ! mpegtsmux ! filesink location={args.record} buffer-mode=2"
        factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        factory.connect("media-configure", lambda _factory, media: watch_publisher(media))
    factory.set_launch(f"( {launch} )")
    factory.set_shared(not args.record)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/test", factory)
    if server.attach(None) == 0:
        print("could not listen", flush=True)
        return 1
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    GLib.timeout_add(200, lambda: True)  # let Python run signal handlers
    print(f"ready rtsp://127.0.0.1:{args.port}/test", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
