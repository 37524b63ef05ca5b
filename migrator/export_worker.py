"""One part of a large export, in a process of its own (see `export_lines`):
`python -m migrator.export_worker LEDGER TARGET FORMAT FIRST_ID LAST_ID PART` writes the
rows of TARGET whose id is in [FIRST_ID, LAST_ID] to the file PART and prints how many.
"""

from __future__ import annotations

import signal
import sqlite3
import sys

from migrator.export_lines import write_part


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    database, target, fmt, first, last, part = argv
    try:
        count = write_part(database, target, fmt, (int(first), int(last)), part)
    except (OSError, sqlite3.Error, UnicodeError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
