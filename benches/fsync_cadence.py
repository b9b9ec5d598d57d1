#!/usr/bin/env python3
"""The raw sync floor at a given cadence: a 1 KiB write + fdatasync into a
preallocated file, back to back and with pauses between them (as a broker
publishing at 1,000 msg/s syncs once a millisecond).

usage: benches/fsync_cadence.py [DIR=.] [COUNT=1500]
  env: BUSY=N  run N busy loops (child processes, each ended with the run
               and after 120 s at most) while measuring, to keep the CPUs
               from halting while the disk works

Prints the p50 / p90 / p99 of each sync for each pause, twice over, with
the pause spent sleeping and spent spinning (a busy CPU rules out the
wake-up of an idle one as the cause of a difference). Writes one scratch
file of 8 MiB in DIR and removes it.
"""

import os
import signal
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "."
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
PAUSES = [(0.0, False), (0.001, False), (0.001, True), (0.004, False), (0.01, False)]


def run(fd, payload, pause, spin):
    times = []
    for i in range(COUNT):
        start = time.perf_counter()
        os.pwrite(fd, payload, (i * len(payload)) % (8 << 20))
        os.fdatasync(fd)
        times.append((time.perf_counter() - start) * 1e6)
        if pause:
            if spin:
                until = time.perf_counter() + pause
                while time.perf_counter() < until:
                    pass
            else:
                time.sleep(pause)
    times.sort()
    pct = lambda p: times[min(len(times) - 1, int(len(times) * p))]
    how = "spinning" if spin else "sleeping"
    print(
        f"pause {pause * 1000:4.1f} ms ({how}): fdatasync p50 {pct(0.5):4.0f} µs, "
        f"p90 {pct(0.9):4.0f} µs, p99 {pct(0.99):4.0f} µs",
        flush=True,
    )


def busy_loops(n):
    """Starts n child processes that spin for at most 120 s; returns their pids."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            until = time.monotonic() + 120
            while time.monotonic() < until:
                pass
            os._exit(0)
        pids.append(pid)
    return pids


def main():
    busy = busy_loops(int(os.environ.get("BUSY", "0")))
    try:
        measure()
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def measure():
    path = os.path.join(DIR, "fsync_cadence.scratch")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\0" * (8 << 20))
        os.fsync(fd)
        payload = os.urandom(1024)
        for _ in range(2):
            for pause, spin in PAUSES:
                run(fd, payload, pause, spin)
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
