"""A bundle's identity (runtime.manifest.Identity): the name and version the user gives at export, the UTC
time of the export, and fingerprints of the run that made it.

The training-data fingerprint is computed by `tilecore train` (train.fit.data_fingerprint, kept in the run's
metadata per category); the config hash is the sha256 of the run's config.json in canonical JSON (sorted
keys, no spaces), so two runs with the same settings hash alike whatever their file's formatting.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Identity
from tilecore.train.run_dir import CONFIG_FILE, read_json, read_metadata

DEFAULT_VERSION = "1"


def config_sha256(run_dir: Path) -> str:
    """sha256 of the run config's canonical JSON."""
    raw: Any = read_json(run_dir / CONFIG_FILE)
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_label(value: str, option: str) -> str:
    """A name or version: non-empty, printable, no surrounding spaces (it is printed and compared as is)."""
    if not value or not value.isprintable() or value != value.strip():
        raise TilecoreError(f"{option} {value!r}: expected a non-empty printable name without surrounding spaces")
    return value


def bundle_identity(run_dir: Path, category: str, name: str | None = None, version: str | None = None) -> Identity:
    """The identity of the bundle exported from `category` of `run_dir`; name defaults to the category."""
    run_dir = Path(run_dir)
    name = check_label(category if name is None else name, "--name")
    version = check_label(DEFAULT_VERSION if version is None else version, "--version")
    fingerprint = read_metadata(run_dir).get("data_fingerprints", {}).get(category)  # None: trained before
    sha = fingerprint.get("sha256") if isinstance(fingerprint, dict) else None
    images = fingerprint.get("images", 0) if isinstance(fingerprint, dict) and sha is not None else 0
    return Identity(name, version, utc_now(), sha, images, config_sha256(run_dir))
