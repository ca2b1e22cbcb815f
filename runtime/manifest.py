"""The bundle manifest: what a bundle holds and how to run it, checked on load.

A bundle is a folder with manifest.json, one ONNX graph per distinct backbone and one FAISS index per
(member, tile location). The manifest records the sha256 of every other file; loading refuses a bundle
whose files are missing, altered or truncated, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.errors import TilecoreError

MANIFEST_FILE = "manifest.json"
FORMAT = "tilecore-bundle"
FORMAT_VERSION = 1


def read_manifest(bundle: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load and check a bundle's manifest (and, with `verify`, every file's checksum)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise TilecoreError(f"bundle {bundle}: folder not found")
    if not path.is_file():
        raise TilecoreError(f"bundle {bundle}: no {MANIFEST_FILE} (not a bundle, or an unfinished export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TilecoreError(f"bundle {bundle}: {MANIFEST_FILE} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise TilecoreError(f"bundle {bundle}: {MANIFEST_FILE} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise TilecoreError(f"bundle {bundle}: format version {version}, this runtime reads {FORMAT_VERSION}")
    if verify:
        for name, expected in manifest["files"].items():
            file = bundle / name
            if not file.is_file():
                raise TilecoreError(f"bundle {bundle}: {name} is missing")
            if sha256_file(file) != expected:
                raise TilecoreError(f"bundle {bundle}: {name} is corrupt or altered (sha256 mismatch)")
    return manifest
