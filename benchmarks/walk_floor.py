"""The floor of `migrator plan` and of a no-op re-run: walk a tree and stat every file.

    python benchmarks/walk_floor.py ROOT                    # one line per file, as a plan
    python benchmarks/walk_floor.py ROOT --save-state FILE  # remember size and mtime
    python benchmarks/walk_floor.py ROOT --state FILE       # what changed since then

Any tool must at least list the tree and stat each file to plan it, or to know that
nothing changed since the last run; a script that keeps its state in a JSON file does
no more than that. No naming, no collision check, no database, no request. Prints
`walk: N files, K unchanged` (K only with --state) on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def walk(root: str) -> Iterator[os.DirEntry[str]]:
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--state", type=Path, help="compare with this saved state")
    group.add_argument("--save-state", type=Path, help="save the state here")
    args = parser.parse_args()
    known: dict[str, list[int]] = json.loads(args.state.read_text()) if args.state else {}
    state: dict[str, list[int]] = {}
    files = unchanged = 0
    out = sys.stdout
    for entry in walk(args.root):
        info = entry.stat(follow_symlinks=False)
        files += 1
        if args.state is not None:
            unchanged += known.get(entry.path) == [info.st_size, info.st_mtime_ns]
        elif args.save_state is not None:
            state[entry.path] = [info.st_size, info.st_mtime_ns]
        else:
            out.write(f"{info.st_size}\t{entry.path}\n")
    if args.save_state is not None:
        args.save_state.write_text(json.dumps(state))
    tail = f", {unchanged} unchanged" if args.state is not None else ""
    print(f"walk: {files} files{tail}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
