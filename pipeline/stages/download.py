"""Fetch the names list and verify its sha256.

Reads params data.url and data.sha256; writes the verified bytes to ``--out``.
When the environment variable NAMES_MIRROR (a local path or file:// URL) is set, it
is used instead of data.url, and a missing mirror is an error (no silent fallback).
With ``--record``, also the stage's run record (wall time, revision, source used).
Run: python -m pipeline.stages.download --out data/raw/names.txt --record data/runs/download.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline import outputs, params, records

MIRROR_VAR = "NAMES_MIRROR"
TIMEOUT = 30  # seconds


def fetch(url: str, timeout: float = TIMEOUT) -> bytes:
    """Bytes at ``url`` (http, https, file) or at a local path.

    Raises:
        OSError: when it cannot be read, naming the URL and the reason.
    """
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise OSError(f"unsupported URL scheme {scheme!r} in {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot fetch {url}: {reason}") from None


def download(url: str, sha256: str, out: Path, mirror: str | None = None) -> str:
    """Fetch from ``mirror`` (if given) else ``url``, check ``sha256``, write ``out``.

    The checksum is of the raw bytes, before any decoding or normalisation.
    Returns the source used. Raises OSError (unreachable URL or missing mirror, with
    what to do) or ValueError (checksum mismatch, naming both hashes); in both cases
    nothing is written.
    """
    source = mirror or url
    try:
        data = fetch(source)
    except OSError as e:
        if mirror:
            hint = (
                f"{MIRROR_VAR}={mirror} is set but cannot be read; point it at a copy of "
                f"names.txt, or unset it to download from data.url"
            )
        else:
            hint = (
                f"Offline? Set {MIRROR_VAR} to a local copy of the file (a path or "
                f"file:// URL), e.g. {MIRROR_VAR}=/path/to/names.txt"
            )
        raise OSError(f"{e}. {hint}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(
            f"checksum mismatch for {source}: expected sha256 {sha256} (params data.sha256), "
            f"got {got} ({len(data)} bytes). If this is the file you want, set data.sha256 "
            "to the second hash."
        )
    with outputs.atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    p = params.load(args.params, params.stage_keys("download"))
    mirror = os.environ.get(MIRROR_VAR) or None
    source = download(p["data.url"], p["data.sha256"], args.out, mirror)
    records.write_record(args.record, source=source)
    print(f"wrote {args.out} from {source}")


if __name__ == "__main__":
    outputs.run(main)
