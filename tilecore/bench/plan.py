"""Which measurements a `tilecore bench` call makes, and the images they use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from tilecore.bench.measure import BACKENDS, Job
from tilecore.bench.protocol import Protocol
from tilecore.runtime.engines.table import BENCH_PRECISIONS
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Manifest, read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PRECISIONS_BY_BACKEND = BENCH_PRECISIONS  # what each backend can compute in; other pairs are not measured


def machine_description() -> str:
    """CPU model and core count (Linux), e.g. "Intel(R) Xeon(R) ... , 2 cores"."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def parse_list(text: str, name: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise TilecoreError(f"{name} {text!r}: expected a comma-separated list")
    for item in items:
        if allowed is not None and item not in allowed:
            raise TilecoreError(f"{name} {item!r}: expected one of {', '.join(allowed)}")
    return items


def parse_batches(text: str, option: str = "--batch") -> tuple[int, ...]:
    """Positive integers, comma-separated (batch sizes, stream counts, resolutions)."""
    try:
        values = tuple(int(x) for x in parse_list(text, option))
    except ValueError:
        raise TilecoreError(f"{option} {text!r}: expected positive integers such as 1,8,16") from None
    if any(v < 1 for v in values):
        raise TilecoreError(f"{option} {text!r}: expected positive integers such as 1,8,16")
    return values


def synthetic_inputs(folder: Path, height: int, width: int, count: int) -> list[str]:
    """Smooth random textures at the bundle's image size, written once as PNG (speed does not depend on content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"noise_{height}x{width}_{i:03d}.png"
        if not path.is_file():
            coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(path), image)
        paths.append(str(path))
    return paths


def input_images(images_dir: Path | None, manifest: Manifest, work: Path, count: int) -> list[str]:
    if images_dir is None:
        height, width = manifest.image_size
        return synthetic_inputs(work / "inputs", height, width, count)
    if not images_dir.is_dir():
        raise TilecoreError(f"--images {images_dir}: not a folder")
    paths = sorted(str(p) for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TilecoreError(f"--images {images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return paths[:count]


def plan_jobs(
    bundles: list[Path],
    devices: list[str],
    precisions: list[str],
    protocol: Protocol,
    work: Path,
    images_dir: Path | None = None,
    threads: int = 0,
    run: str = "",
    image_count: int = 16,
    streams: tuple[int, ...] = (1,),
    trust: Path | None = None,
) -> tuple[list[Job], list[str]]:
    """(jobs in measurement order, notes on the pairs that are skipped). `streams`: OpenVINO is measured
    at each; the other backends run one stream. `trust`: every bundle must be signed by this public key,
    here and again in each worker that loads it."""
    for device in devices:
        if device not in BACKENDS:
            raise TilecoreError(f"--device {device!r}: expected one of {', '.join(BACKENDS)}")
    jobs, notes = [], []
    for bundle in bundles:
        manifest = read_manifest(bundle, trust=trust)  # a bad bundle is refused before anything is timed
        images = input_images(images_dir, manifest, work, image_count)
        for device in devices:
            for precision in precisions:
                if precision not in PRECISIONS_BY_BACKEND[device]:
                    notes.append(f"{bundle.name}: {device} does not run {precision}; not measured")
                    continue
                for count in streams if device == "openvino" else (1,):
                    job = Job(str(bundle), device, precision, images, protocol, threads, bundle.name, run)
                    jobs.append(replace(job, streams=count, trust=str(trust or "")))
    return jobs, notes
