"""Static shards: `--shard K/N` splits one job among N processes that share nothing.

An item belongs to shard `stable_hash(upload_path, file_name) mod N`: a hash of where
the item lands and of nothing else, so its shard does not depend on the other items,
on the order of the sources or on the process (Python's own `hash()` is salted per
process and would not do). K counts from 0, like Kubernetes' JOB_COMPLETION_INDEX:
the shards of 4 are 0/4, 1/4, 2/4 and 3/4.

Each shard keeps its own ledger, lock, log and outputs, named after the unsharded
ones: `NAME.sqlite` becomes `NAME.shard-K-of-N.sqlite`. `migrator ledger merge`
folds the shards' ledgers into one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from migrator.model import Manifest

SHARD_ENV = "MIGRATOR_SHARD"
MAX_SHARDS = 100_000  # what Kubernetes allows an Indexed Job's completions
SHARD_FORM = "K/N with 0 <= K < N, e.g. 0/4 (K counts from 0, like JOB_COMPLETION_INDEX)"


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (1 <= self.count <= MAX_SHARDS and 0 <= self.index < self.count):
            raise ValueError(f"{self} is not a shard: {SHARD_FORM}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"2/4"` -> Shard(2, 4); ValueError, in one line, for anything else."""
        index, slash, count = text.strip().partition("/")
        if not (slash and _is_number(index) and _is_number(count)):
            raise ValueError(f"{text!r} is not a shard: {SHARD_FORM}")
        if int(count) > MAX_SHARDS:
            raise ValueError(f"{text!r}: at most {MAX_SHARDS:,} shards")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """`shard-2-of-4`: what the shard's files carry in their names."""
        return f"shard-{self.index}-of-{self.count}"

    def holds(self, upload_path: str, file_name: str) -> bool:
        """Whether the item landing at upload_path/file_name is this shard's."""
        return shard_of(upload_path, file_name, self.count) == self.index

    def file_for(self, path: Path) -> Path:
        """This shard's own file for `path`: `job.sqlite` -> `job.shard-2-of-4.sqlite`."""
        return path.with_name(f"{path.stem}.{self.tag}{path.suffix}")


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9


def shard_of(upload_path: str, file_name: str, count: int) -> int:
    """The shard (0 to count - 1) an item belongs to; the same in every process."""
    # A NUL appears in no name (naming refuses control characters): the pair is unambiguous.
    key = f"{upload_path}\0{file_name}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def chosen_shard(flag: str | None, environ: Mapping[str, str]) -> Shard | None:
    """The shard `--shard` names, else $MIGRATOR_SHARD, else None (the whole job).
    ValueError names where the bad value came from."""
    if flag is not None:
        where, text = "--shard", flag
    else:
        where, text = f"${SHARD_ENV}", environ.get(SHARD_ENV, "")
        if not text.strip():
            return None
    try:
        return Shard.parse(text)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def for_shard(manifest: Manifest, shard: Shard | None) -> Manifest:
    """The job as shard `shard` sees it: only its items (plan filters by `shard`), its
    own ledger (and so its own lock and log) and its own output files."""
    if shard is None:
        return manifest
    if manifest.ledger_url is not None:
        raise ValueError(
            "--shard: a postgresql:// ledger needs no shards; its workers claim the items "
            "(drop --shard, or use a ledger file per shard)"
        )
    outputs = manifest.outputs
    return replace(
        manifest,
        ledger=shard.file_for(manifest.ledger),
        outputs=replace(
            outputs,
            jsonl=_own(shard, outputs.jsonl),
            csv=_own(shard, outputs.csv),
            json=_own(shard, outputs.json),
            metrics=_own(shard, outputs.metrics),
        ),
        shard=shard,
    )


def _own(shard: Shard, path: Path | None) -> Path | None:
    return None if path is None else shard.file_for(path)
