"""The loop the vendor's documentation suggests: one file after another, one request each.

    KIE_API_KEY=... python benchmarks/sequential_loop.py --base-url URL --items LIST

The overview's "Batch File Upload" example uploads several files with the file stream
endpoint, one after the other, each with its own request, as its curl examples do:
a new connection per file (like `requests.post` without a Session, or one `curl -F`
per file), the multipart body built whole in memory (as `requests` builds `files=`),
no concurrency. A URL item is sent as the URL upload of the docs' example. Standard
library only. Prints `sequential: N uploaded, M failed, B bytes in S s`; exits 1 when
any item failed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from upload_items import (
    STREAM_ENDPOINT,
    URL_ENDPOINT,
    Item,
    answer_problem,
    multipart,
    read_items,
    url_body,
)


def upload(base_url: str, key: str, item: Item) -> tuple[int, str | None]:
    """One item on a new connection; returns (bytes of the file sent, problem or None)."""
    size: int | None = None
    if item.is_url:
        endpoint, content_type, body = URL_ENDPOINT, "application/json", url_body(item)
    else:
        with open(item.source, "rb") as handle:
            data = handle.read()
        size = len(data)
        form = multipart(item)
        endpoint, content_type = STREAM_ENDPOINT, form.content_type
        body = form.preamble + data + form.epilogue
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
    try:
        connection.request(
            "POST",
            parts.path.rstrip("/") + endpoint,
            body=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        response = connection.getresponse()
        return size or 0, answer_problem(response.status, response.read(), size)
    except (OSError, http.client.HTTPException) as err:
        return 0, f"{type(err).__name__}: {err}"
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--items", type=Path, required=True, help="the item list")
    args = parser.parse_args()
    key = os.environ.get("KIE_API_KEY", "")
    if not key:
        print("sequential: set KIE_API_KEY", file=sys.stderr)
        return 2
    started = time.perf_counter()
    sent, problems = 0, []
    items = read_items(args.items)
    for item in items:
        size, problem = upload(args.base_url, key, item)
        if problem is None:
            sent += size
        else:
            problems.append(problem)
    took = time.perf_counter() - started
    for problem in problems[:5]:
        print(f"sequential: {problem}", file=sys.stderr)
    print(
        f"sequential: {len(items) - len(problems)} uploaded, {len(problems)} failed, "
        f"{sent} bytes in {took:.2f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
