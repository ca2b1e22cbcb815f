"""`tilecore info BUNDLE`: what a bundle is and holds, from its checked manifest, as a dict or as text.

Nothing here loads an engine or an index, so it runs wherever the runtime installs. Every file the
manifest lists is checked against its sha256 first (a corrupt bundle is refused, not described). A
signature is reported with the fingerprint of the key it names; it is verified only with `trust`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tilecore.runtime.manifest import FORMAT_VERSION, NOT_IN_FILES, SIGNATURE_FILE, Manifest, read_manifest


def precisions(manifest: Manifest) -> dict[str, list[str]]:
    """The precisions the bundle can run, per engine kind: onnx (fp32; bf16 and int8 when exported) and
    tensorrt (one entry per serialized engine, with the GPU it was built for)."""
    onnx = ["fp32"]
    block = manifest.reduced_precision
    if block is not None and block.int8:
        onnx.append("int8")
    if block is not None and block.bf16 is not None:
        onnx.append("bf16")
    tensorrt = [f"{r.precision} ({r.gpu_name}, TensorRT {r.tensorrt_version})" for r in manifest.tensorrt]
    return {"onnx": onnx, "tensorrt": tensorrt}


def bundle_info(bundle: str | Path, trust: str | Path | None = None) -> dict[str, Any]:
    """The bundle's identity, members, geometry, thresholds, precisions, files and signature."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True, trust=trust)
    names = [*manifest.files, *(name for name in NOT_IN_FILES if (bundle / name).is_file())]
    signature = None
    if (bundle / SIGNATURE_FILE).is_file():
        from tilecore.runtime.signing import read_signature

        signature = {"key_fingerprint": read_signature(bundle).key_fingerprint, "verified": trust is not None}
    identity = manifest.identity.to_dict() if manifest.identity is not None else None
    t = manifest.thresholds
    return {
        "bundle": str(bundle),
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "tilecore_version": manifest.tilecore_version,
        "category": manifest.category,
        "members": [
            {
                "backbone": m.backbone,
                "layers": list(m.layers),
                "weights_source": m.weights_source,
                "engine": m.engine,
                "embedding_dim": m.embedding_dim,
                "index_kind": m.index_kind,
                "banks": len(m.indexes),
                "rows": [record.rows for record in m.indexes],
            }
            for m in manifest.members
        ],
        "image_size": list(manifest.image_size),
        "tiling": {
            "tile": list(manifest.tiling.tile),
            "stride": list(manifest.tiling.stride),
            "grid": list(manifest.tiling.grid),
            "backbone_input": list(manifest.tiling.backbone_input),
            "stacked": manifest.tiling.stacked,
        },
        "thresholds": {
            "image": t.image,
            "image_rule": t.image_rule,
            "pixel": t.pixel,
            "pixel_rule": t.pixel_rule,
            "recalibrated": t.recalibrated is not None,
        },
        "precisions": precisions(manifest),
        "cascade": None if manifest.cascade is None else without_scores(manifest.cascade, "calibration_scores"),
        "coarse": None if manifest.coarse is None else without_scores(manifest.coarse, "gate_scores"),
        "files": {"count": len(names), "bytes": sum((bundle / name).stat().st_size for name in names)},
        "signed": signature,
    }


def without_scores(record: Any, key: str) -> dict[str, Any]:
    """A cascade or coarse record's dict with its calibration scores (what tilecore calibrate refits on)
    replaced by whether it has them: info shows what a bundle does, not hundreds of numbers."""
    record = record.to_dict()
    kept = {k: v for k, v in record.items() if k != key}
    kept["refittable"] = bool(record.get(key))
    return kept


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def info_lines(info: dict[str, Any]) -> list[str]:
    """`bundle_info` as text for people: one fact per line."""
    ident = info["identity"]
    lines = [f"bundle     {info['bundle']} (format version {info['format_version']})"]
    if ident is not None:
        data = ident["training_data_sha256"]
        lines += [
            f"name       {ident['name']}, version {ident['version']}",
            f"created    {ident['created']} with tilecore {info['tilecore_version']}",
            f"category   {info['category']}",
            "data       " + (f"sha256 {data} ({ident['training_images']} training + validation images)"
                             if data is not None else "not recorded (the run was trained before tilecore kept it)"),
            f"config     sha256 {ident['config_sha256']}",
        ]  # fmt: skip
    else:
        lines += [f"category   {info['category']} (tilecore {info['tilecore_version']})"]
    for i, m in enumerate(info["members"]):
        rows = m["rows"]
        rows_text = f"{rows[0]} rows" if len(set(rows)) == 1 else f"{min(rows)}-{max(rows)} rows"
        lines.append(
            f"member {i}   {m['backbone']} [{', '.join(m['layers'])}] ({m['weights_source']}), D={m['embedding_dim']}, "
            f"{m['banks']} {m['index_kind']} bank(s) of {rows_text}"
        )
    tiling = info["tiling"]
    h, w = info["image_size"]
    lines += [
        f"image      {h} x {w} px; tiles {tiling['tile'][0]} x {tiling['tile'][1]}, stride "
        f"{tiling['stride'][0]} x {tiling['stride'][1]}, grid {tiling['grid'][0]} x {tiling['grid'][1]}"
        + (", stacked" if tiling["stacked"] else ""),
    ]
    t = info["thresholds"]
    lines.append(
        f"thresholds image {t['image']:.6g} ({t['image_rule']}), pixel {t['pixel']:.6g} ({t['pixel_rule']})"
        + (", recalibrated" if t["recalibrated"] else "")
    )
    if info["cascade"] is not None:
        c = info["cascade"]
        for i, stage in enumerate(c["stages"]):
            window = (
                "runs the rest" if stage["window"] is None else "exit outside [{:.4g}, {:.4g}]".format(*stage["window"])
            )
            lines.append(
                f"cascade {i + 1}  members {stage['members']}, {stage['gflops']:.3g} GFLOPs, {window}; "
                f"{stage['exit_share']:.1%} of calibration images end here"
            )
        order = {"cheapest": "cheapest first", "given": "as configured", "search": "searched"}[c["order_rule"]]
        refit = "refit by tilecore calibrate" if c["refittable"] else "moved by tilecore calibrate"
        lines.append(
            f"           agreement with the full ensemble {c['agreement']:.4f} on {c['calibration_images']} "
            f"calibration images (target {c['target_agreement']}); order {order}; windows {refit}; "
            "`tilecore run --cascade off` runs all"
        )
    if info.get("coarse") is not None:
        c = info["coarse"]
        threshold = "none, every tile runs" if c["tile_threshold"] is None else f"{c['tile_threshold']:.4g}"
        lines.append(
            f"coarse     {c['member']['backbone']} on the whole image at {c['tiling']['backbone_input'][0]} x "
            f"{c['tiling']['backbone_input'][1]} px picks the tiles (threshold {threshold}): {c['tile_share']:.1%} of "
            f"tiles ran, agreement {c['agreement']:.4f} on {c['calibration_images']} calibration images "
            f"(target {c['target_agreement']}); `tilecore run --cascade off` runs all"
        )
    p = info["precisions"]
    lines.append(f"precisions onnx {', '.join(p['onnx'])}; tensorrt {', '.join(p['tensorrt']) or 'none'}")
    lines.append(f"files      {info['files']['count']}, {_size(info['files']['bytes'])} (every sha256 checked)")
    signed = info["signed"]
    if signed is None:
        lines.append("signed     no")
    else:
        state = "verified with the trusted key" if signed["verified"] else "not verified (pass --trust KEY)"
        lines.append(f"signed     yes, key {signed['key_fingerprint']} ({state})")
    return lines
