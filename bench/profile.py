"""Where framebroker's frame path spends its time: py-spy across compare.py's processes.

    python bench/profile.py                       # 1080p, 4 readers, producer flat out, 8 s
    python bench/profile.py --pace 30fps          # the same at 30 fps (where wake-ups dominate)
    python bench/profile.py --readers 16 --native # with C frames (memcpy, fcntl, sem_post)

Runs ``compare.py`` for framebroker alone with one long phase, sampled by ``py-spy record
--subprocesses``, and prints for the producer and for the readers the functions holding the
most samples: ``self`` (in the function's own code) and ``total`` (including what it calls), as
a share of that role's samples. Sleeping threads are not sampled, but on a saturated machine a
thread that was woken and waits for a core is (it shows on the line that woke it, usually a
semaphore wait); ``--gil`` keeps only samples holding the GIL: the Python code, without the
system calls and numpy copies that release it. ``perf record -e cpu-clock`` on the same command
gives the CPU split by native symbol (memcpy, kernel, interpreter).
Needs py-spy (``pip install py-spy``) and permission to ptrace the children (root, or
``kernel.yama.ptrace_scope=0``). The raw stacks are kept for a flame graph
(``bench/results/profile-*.txt``, collapsed-stack format).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# A frame in py-spy's raw output: "function (file:line)"; C frames have no line.
_LINE = re.compile(r":\d+\)$")
ROLES = {"producer": "_run_producer", "reader": "_run_reader"}
# Only samples below these count: the measured phases, not start-up or reporting.
PHASES = {"producer": ("_full_speed_phase", "_paced_phase"), "reader": ("_run_reader",)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", default="framebroker", help="profile another transport the same way, for comparison")
    parser.add_argument("--size", default="1080p")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--pace", choices=("flat", "30fps"), default="flat", help="producer flat out, or at 30 fps")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=400, help="samples per second per process")
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL: Python code, without waits and system calls")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("profile.py needs py-spy: pip install py-spy")
    if args.pace == "flat":
        phases = ["--latency-frames", "6", "--throughput-s", str(args.seconds)]
    else:
        phases = ["--latency-frames", str(int(args.seconds * 30)), "--throughput-s", "0.1"]
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = RESULTS / f"profile-{args.transport}-{args.size}-{args.readers}r-{args.pace}-{stamp}.txt"
    command = [
        "py-spy", "record", "--subprocesses", "--format", "raw", "--rate", str(args.rate), "--output", str(raw),
        *(["--native"] if args.native else []),
        *(["--gil"] if args.gil else []),
        "--", sys.executable, str(BENCH / "compare.py"), "--transports", args.transport, "--sizes", args.size,
        "--readers", str(args.readers), "--reps", "1", "--integrity-s", "0.1", "--idle-s", "0.3",
        "--latest-sizes", "", "--out", str(RESULTS / f"profile-run-{stamp}.json"), *phases,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"{args.transport}, {args.size}, {args.readers} readers, producer {args.pace}, {args.seconds:g} s; raw stacks: {raw}")
    for role, lines in summarize(raw.read_text(), args.top).items():
        print(f"\n{role}:")
        print("\n".join(lines))
    return 0


def summarize(text: str, top: int) -> dict[str, list[str]]:
    samples: dict[str, int] = collections.Counter()
    own: dict[str, collections.Counter] = {role: collections.Counter() for role in ROLES}
    total: dict[str, collections.Counter] = {role: collections.Counter() for role in ROLES}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        role = next((r for r, marker in ROLES.items() if any(f.startswith(marker + " ") for f in frames)), None)
        if role is None:
            continue
        start = max((i for i, f in enumerate(frames) if f.split(" ")[0] in PHASES[role]), default=None)
        if start is None:
            continue
        below = frames[start + 1 :] or frames[start : start + 1]
        samples[role] += count
        own[role][below[-1]] += count
        for function in {_LINE.sub(")", f) for f in below}:
            total[role][function] += count
    report = {}
    for role in ROLES:
        n = samples[role] or 1
        lines = [f"  {samples[role]} samples in the measured phases", "  self  total  function"]
        self_by_function: dict[str, int] = collections.Counter()
        for frame, count in own[role].items():
            self_by_function[_LINE.sub(")", frame)] += count
        ranked = sorted(total[role].items(), key=lambda item: -item[1])[:top]
        for function, count in ranked:
            lines.append(f"  {100 * self_by_function.get(function, 0) / n:4.0f}% {100 * count / n:5.0f}%  {function}")
        lines.append("  hottest lines (self):")
        for frame, count in own[role].most_common(8):
            lines.append(f"  {100 * count / n:4.0f}%         {frame}")
        report[role] = lines
    return report


if __name__ == "__main__":
    raise SystemExit(main())
