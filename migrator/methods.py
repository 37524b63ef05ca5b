"""How a file is sent: the upload-method rules, in one place (pure).

The manifest check (a method named in the YAML) and the plan (every item) both ask
here, so a rule and its message exist once. The documented limits: base64 is for
files up to 10 MB, URL uploads up to 100 MB; a remote file too big for a URL upload
is streamed through this machine.
"""

from __future__ import annotations

from collections.abc import Iterable

from migrator.model import BASE64_LIMIT, URL_LIMIT, Method, Settings, SourceKind


def choose_method(
    kind: SourceKind, size: int | None, requested: Method, settings: Settings
) -> Method:
    """How to send a file: base64 up to base64_max, stream above; remote files by URL up
    to url_max (or when the size is unknown), streamed through above.

    An explicit `requested` method wins, but raises ValueError (with the reason) for
    base64 over 10 MiB, url over 100 MiB, base64 for a remote file or url for a local one.
    """
    if requested is Method.AUTO:
        return automatic_method(kind, size, settings)
    reason = forced_method_problem(kind, size, requested)
    if reason:
        raise ValueError(reason)
    return requested


def forced_method_problem(kind: SourceKind, size: int | None, requested: Method) -> str | None:
    """Why a method named in the manifest cannot be used for this file, or None.
    `size` None: not known yet (checked again once it is)."""
    if requested is Method.URL and kind is SourceKind.FILE:
        return "url applies to remote sources only (url and url_list)"
    if requested is Method.BASE64 and kind is SourceKind.URL:
        return "base64 is refused for remote files; use stream (streamed through)"
    if requested is Method.BASE64 and size is not None and size > BASE64_LIMIT:
        return f"base64 is refused above 10 MiB ({size} bytes); use stream"
    if requested is Method.URL and size is not None and size > URL_LIMIT:
        return f"url is refused above 100 MiB ({size} bytes); use stream"
    return None


def automatic_method(kind: SourceKind, size: int | None, settings: Settings) -> Method:
    """The method by size alone (what refresh uses, and the plan when nothing is forced)."""
    if kind is SourceKind.FILE:
        return automatic_methods((size,), settings)[0]
    if size is None or size <= settings.url_max:
        return Method.URL
    return Method.STREAM


def automatic_methods(sizes: Iterable[int | None], settings: Settings) -> list[Method]:
    """`automatic_method` of local files of these sizes (a folder of them at once)."""
    base64, stream, most = Method.BASE64, Method.STREAM, settings.base64_max
    # An empty file goes by stream: an empty base64Data reads as a missing one.
    return [base64 if size is not None and 0 < size <= most else stream for size in sizes]
