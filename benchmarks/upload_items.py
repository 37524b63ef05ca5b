"""What the benchmark's own contenders share: the item list and the request bodies.

An item list is a text file, one item a line: `SOURCE<TAB>UPLOAD_PATH<TAB>FILE_NAME`,
where SOURCE is a local path or an http(s) URL. compare.py writes it with the names
`migrator run` gives the same files, so every contender overwrites the same objects.

The bodies are those migrator sends (see migrator/client.py): base64 JSON with a data
URL for small files, multipart/form-data with uploadPath, fileName and the file part
for streamed ones, and JSON with fileUrl for URL items. Standard library only, so the
sequential loop that imports it stays a plain script.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BASE64_ENDPOINT = "/api/file-base64-upload"
STREAM_ENDPOINT = "/api/file-stream-upload"
URL_ENDPOINT = "/api/file-url-upload"


@dataclass(frozen=True, slots=True)
class Item:
    source: str
    upload_path: str
    file_name: str

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


def write_items(path: Path, items: Iterable[Item]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            out.write(f"{item.source}\t{item.upload_path}\t{item.file_name}\n")
            count += 1
    return count


def read_items(path: Path) -> list[Item]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            source, upload_path, file_name = line.split("\t")
            items.append(Item(source, upload_path, file_name))
    return items


def mime_type(file_name: str) -> str | None:
    return mimetypes.guess_type(file_name, strict=False)[0]


def base64_body(data: bytes, item: Item) -> bytes:
    encoded = base64.b64encode(data).decode("ascii")
    mime = mime_type(item.file_name)
    payload = {
        "base64Data": f"data:{mime};base64,{encoded}" if mime else encoded,
        "uploadPath": item.upload_path,
        "fileName": item.file_name,
    }
    return json.dumps(payload).encode()


def url_body(item: Item) -> bytes:
    payload = {"fileUrl": item.source, "uploadPath": item.upload_path, "fileName": item.file_name}
    return json.dumps(payload).encode()


@dataclass(frozen=True, slots=True)
class Multipart:
    """The bytes around the file's own in a multipart/form-data body."""

    content_type: str
    preamble: bytes
    epilogue: bytes

    def length(self, size: int) -> int:
        return len(self.preamble) + size + len(self.epilogue)


def multipart(item: Item) -> Multipart:
    boundary = "----bench" + secrets.token_hex(16)
    mime = mime_type(item.file_name) or "application/octet-stream"
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="uploadPath"\r\n\r\n'
        f"{item.upload_path}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="fileName"\r\n\r\n'
        f"{item.file_name}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{item.file_name}"\r\nContent-Type: {mime}\r\n\r\n'
    ).encode()
    return Multipart(
        f"multipart/form-data; boundary={boundary}", preamble, f"\r\n--{boundary}--\r\n".encode()
    )


def answer_problem(status: int, body: bytes, size: int | None) -> str | None:
    """None when the service took the file (and stored `size` bytes, when given)."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return f"HTTP {status}, not JSON"
    if status != 200 or not isinstance(envelope, dict) or envelope.get("success") is not True:
        return f"HTTP {status}: {str(envelope)[:200]}"
    stored = (envelope.get("data") or {}).get("fileSize")
    if size is not None and stored != size:
        return f"stored {stored} bytes, sent {size}"
    return None
