"""Run one command and write down its own resource use: compare.py's launcher.

    python -S -I benchmarks/launch.py RESULT_FILE COMMAND [ARG...]

Why a launcher: the peak RSS the kernel reports for a child (ru_maxrss) counts the
memory image it had before exec, which is its parent's; a child of compare.py would
report compare.py's size whenever it is the larger. This process is the smallest
parent Python makes (no site, no imports beyond os and time: about 8.5 MB), so any
command bigger than that reports its own peak.

Writes `wall cpu max_rss_bytes exit_code` to RESULT_FILE: the wall time from spawn to
reap, the user + system CPU of the command and of every descendant it waited for,
and the peak RSS of the largest single process among them. Exits as the command did.
"""

import os
import sys
import time


def main() -> int:
    result, argv = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    with open(result, "w") as out:
        out.write(f"{wall} {cpu} {usage.ru_maxrss * 1024} {code}\n")  # ru_maxrss: KiB
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
