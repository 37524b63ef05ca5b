"""A worker of a large export, in a process of its own (see `export_lines`):
`python -m migrator.export_worker LEDGER TARGET FORMAT FOLDER` reads lines `INDEX FIRST
LAST` on stdin and, for each, writes the rows of TARGET whose id is in [FIRST, LAST] to
FOLDER's part INDEX, then prints how many (one line, flushed) before reading the next.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import sys

from migrator.export_lines import open_readonly, part_path, write_part


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    database, target, fmt, folder = argv
    try:
        with contextlib.closing(open_readonly(database)) as db:
            for line in sys.stdin:
                index, first, last = map(int, line.split())
                count = write_part(db, target, fmt, (first, last), part_path(folder, index))
                print(count, flush=True)
    except (OSError, sqlite3.Error, UnicodeError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
