"""Reading dataset files: UTF-8 text and JSON lines / JSON list records, every malformed
input one `DataError` naming the file and the line (training splits and evaluation tasks)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import DataError, MissingFileError

_JSON_WS = re.compile(r"[ \t\n\r]*")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def json_type(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


# ---------------------------------------------------------------- reading files


def decode_text(path, data: bytes) -> str:
    """UTF-8 text, or a DataError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the file)") from None


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    return decode_text(path, path.read_bytes())


def read_records(path):
    """Yield (location, record) of a JSON lines (.jsonl) or JSON list (.json) file:
    `file:line` for JSON lines, `file:line: record i` for a JSON list.

    The one reader of every dataset file (training splits, evaluation tasks), so every
    malformed input is reported the same way: one line naming the file and the line.
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json":
        yield from _json_list(path, text)
        return
    # str.splitlines would also split on U+2028 etc., which JSON allows inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _json_list(path: Path, text: str):
    """Scan a JSON list record by record, so each error names the line it is on."""
    decoder = json.JSONDecoder()

    def skip(pos):
        return _JSON_WS.match(text, pos).end()

    def where(pos):
        return f"{path}:{text.count(chr(10), 0, pos) + 1}"

    pos = skip(0)
    if pos == len(text):
        return
    if text[pos] != "[":
        raise DataError(f"{where(pos)}: expected a JSON list of records, [{{...}}, ...]")
    pos, i = skip(pos + 1), 0
    if text.startswith("]", pos):
        pos = skip(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield f"{where(pos)}: record {i}", record
            pos = skip(end)
            if text.startswith(",", pos):
                pos, i = skip(pos + 1), i + 1
            elif text.startswith("]", pos):
                pos = skip(pos + 1)
                break
            else:
                raise DataError(
                    f"{where(pos)}: invalid JSON: expected ',' or ']' after record {i}")
    if pos != len(text):
        raise DataError(f"{where(pos)}: invalid JSON: extra data after the list")

