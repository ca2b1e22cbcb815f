"""The `tilecore` command line: data synth, train, eval, export, run, calibrate, bench, keygen.

User mistakes (TilecoreError) print one line and exit with status 2; heavy libraries are imported
inside the commands so `tilecore --help` stays fast and runtime-only installs keep working.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress

from tilecore.progress import LineProgress, progress_display
from tilecore.runtime.engines import table as engine_table
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.ray_cluster import ADDRESS_HELP

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(no_args_is_help=True, help="Build datasets.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

# Commands that need an extra beyond `runtime`, and the extra each missing module belongs to; a missing one
# is named in one line (main) instead of a traceback.
COMMAND_EXTRAS = {"train": ("train",), "eval": ("train",), "export": ("train", "export"), "data": ("train",)}
COMMAND_MODULES = {  # looked for (not imported) before the command runs, so no other refusal comes first
    "train": ("torch", "timm"),
    "eval": ("torch", "timm"),
    "export": ("torch", "timm", "onnx"),
    "data": ("skimage",),
}
MODULE_EXTRAS = {
    **dict.fromkeys(("torch", "torchvision", "timm", "safetensors", "sklearn", "skimage"), "train"),
    **dict.fromkeys(("onnx", "nncf", "onnxscript"), "export"),
    "openvino": "openvino",
    "matplotlib": "bench",
}


def show_version(value: bool) -> None:
    if value:
        import tilecore

        typer.echo(f"tilecore {tilecore.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print tilecore's version.")
    ] = False,
) -> None:
    """Ensemble visual anomaly detection: train on normal images, export a bundle, score with the lean runtime."""


@contextmanager
def progress_bar() -> Iterator[Progress | LineProgress]:
    """Progress on stderr: a bar on a terminal (erased when the command fails, so a refusal that comes
    mid-way is still the one `error:` line), periodic plain lines in a log file or pipe."""
    with progress_display(console) as progress:
        yield progress


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the MVTec-layout dataset into.")] = Path("data/synth256"),
    size: Annotated[int, typer.Option(help="Image resolution: 256, 512, 1024 or 2048.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    n_train: Annotated[int, typer.Option(help="Normal training images per category.")] = 60,
    n_test_good: Annotated[int, typer.Option(help="Normal test images per category.")] = 15,
    n_test_defect: Annotated[int, typer.Option(help="Defective test images per category.")] = 30,
) -> None:
    """Write a synthetic defect dataset from scikit-image's brick, grass and gravel photographs."""
    from tilecore.train.synth import build_synth_dataset

    categories = ("brick", "grass", "gravel")
    with progress_bar() as progress:
        task = progress.add_task(f"synth {size}px", total=len(categories) * (n_train + n_test_good + n_test_defect))
        summary = build_synth_dataset(
            out,
            size,
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
            seed=seed,
            categories=categories,
            on_image=lambda: progress.advance(task),
        )
    console.print(f"dataset written to {out} ({len(summary.get('categories', categories))} categories)")


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="TOML config; omitted: the built-in defaults.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory to create (or resume).")] = Path("runs/default"),
    data: Annotated[Path | None, typer.Option(help="Dataset root, overriding data.root.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Backbone weights file for every member.")] = None,
    member: Annotated[int | None, typer.Option(help="Train only this member (0-based); combine later.")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N, overriding train.device (auto: cuda if present).")
    ] = None,
    amp: Annotated[
        str | None, typer.Option(help="off, bf16 or fp16 (cuda only): backbone autocast, overriding train.amp.")
    ] = None,
    ray: Annotated[
        str | None, typer.Option(help=f"Fit banks and calibrations as Ray tasks ([ray] resources): {ADDRESS_HELP}.")
    ] = None,
) -> None:
    """Fit one PatchCore memory bank per category; re-running resumes where it stopped."""
    from tilecore.train.config import AMP_MODES, check_device_name, load_config, validate

    if device is not None:
        check_device_name(device, "--device")
    if amp is not None and amp not in AMP_MODES:
        raise TilecoreError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    cfg = load_config(config)
    if device is not None:
        cfg.train.device = device
    if amp is not None:
        cfg.train.amp = amp
    if data is not None:
        cfg.data.root = str(data)
    if weights is not None:
        for m in cfg.members:
            m.weights = str(weights)
    cfg.data.root = str(Path(cfg.data.root).resolve())  # eval and resume work from any folder
    validate(cfg)
    from tilecore.train.fit import train_run  # torch loads only once the config is known to be good

    with progress_bar() as progress, executor_for(ray, cfg) as executor:
        metadata = train_run(cfg, out, progress, member, executor)
    for name, stats in metadata.get("categories", {}).items():
        line = (
            f"{name}: {stats['banks']} bank(s) per member, rows {stats['bank_sizes']}, "
            f"fit {stats['fit_seconds']:.1f} s, skipped {len(stats['skipped_images'])}"
        )
        console.print(escape(line), highlight=False, soft_wrap=True)
    trained_on = metadata.get("train_device", {}).get("device")
    execution = metadata.get("execution", {})
    if execution.get("executor") == "ray":
        trained_on = f"{trained_on}, Ray: {execution['nodes']} node(s), {execution['cluster_cpus']:g} CPUs"
    line = (
        f"run written to {out} (weights: {metadata.get('weights_sources')}, device: {trained_on}); "
        f"evaluate it with `tilecore eval {out}`"
    )
    console.print(escape(line), highlight=False, soft_wrap=True)


@contextmanager
def executor_for(address: str | None, config) -> Iterator:
    """Where train and eval run their jobs: here (`address` None) or on the Ray cluster at `address`."""
    from tilecore.train.executor import Executor

    if address is None:
        yield Executor()
        return
    from tilecore.runtime.ray_cluster import ray_session

    with ray_session(address) as cluster:
        options = {"num_cpus": config.ray.num_cpus, "num_gpus": config.ray.num_gpus}
        yield Executor(cluster, {**options, "max_retries": config.ray.max_retries})


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory written by `tilecore train`.")],
    ray: Annotated[
        str | None, typer.Option(help=f"Evaluate each category as a Ray task ([ray] resources): {ADDRESS_HELP}.")
    ] = None,
) -> None:
    """Image AUROC, pixel AUROC, AUPRO and F1-max on each category's test split."""
    from rich.table import Table

    from tilecore.train.evaluate import METRIC_KEYS, evaluate_run
    from tilecore.train.run_dir import load_run_config

    config = load_run_config(run) if ray is not None else None
    with progress_bar() as progress, executor_for(ray, config) as executor:
        report = evaluate_run(run, progress, executor)
    table = Table(title=f"metrics of {run}")
    table.add_column("category")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    rows = [*report["categories"].items(), ("mean", report["mean"])]
    for name, metrics in rows:
        # pixel metrics need ground-truth masks: n/a where the dataset has none
        table.add_row(name, *("n/a" if metrics[k] is None else f"{metrics[k]:.4f}" for k in METRIC_KEYS))
    Console().print(table)
    staged = {name: m["cascade"] for name, m in report["categories"].items() if "cascade" in m}
    if staged:
        cascades = Table(title="early-exit cascade (shipped by `tilecore export`)")
        for column in ("category", "AUROC full", "AUROC cascade", "agreement", "exits by stage", "GFLOPs"):
            cascades.add_column(column, justify="left" if column == "category" else "right")
        for name, c in staged.items():
            full = report["categories"][name]["image_auroc"]
            exits = " / ".join(f"{share:.0%}" for share in c["exit_shares"])
            spent = f"{c['gflops_per_image']:.2f} of {c['full_gflops_per_image']:.2f}"
            agreement = f"{c['label_agreement']:.4f}"
            cascades.add_row(name, f"{full:.4f}", f"{c['image_auroc']:.4f}", agreement, exits, spent)
        Console().print(cascades)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `tilecore train`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to create.")] = Path("bundle"),
    category: Annotated[str | None, typer.Option(help="Category to export (needed when the run has several).")] = None,
    index: Annotated[str, typer.Option(help="flat (exact), hnsw or ivfpq (approximate, recall measured).")] = "flat",
    tensorrt: Annotated[bool, typer.Option(help="Also build a TensorRT engine per backbone on this GPU.")] = False,
    workspace_gb: Annotated[float | None, typer.Option(help="TensorRT: builder workspace limit, GiB (2).")] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="TensorRT: most tiles per engine call (4, the runtime's default batch).")
    ] = None,
    gpu_id: Annotated[int | None, typer.Option(help="TensorRT: CUDA device to build on (0).")] = None,
    precision: Annotated[str, typer.Option(help=engine_table.export_precision_help())] = "",
    precision_floor: Annotated[float, typer.Option(help="Least label agreement with fp32 on validation.")] = 0.99,
    int8_max_error: Annotated[
        float | None,
        typer.Option(help="int8: keep the costliest layers float until embeddings are within this of fp32 (0.02)."),
    ] = None,
    sign: Annotated[
        Path | None, typer.Option(help="Sign the bundle with this Ed25519 private key (`tilecore keygen`).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="The bundle's model name (default: the category).")] = None,
    version: Annotated[str, typer.Option("--version", help="The bundle's model version.")] = "1",
    cascade: Annotated[
        str | None,
        typer.Option(
            help="auto: an ensemble runs its members cheapest first and stops early where the label is sure "
            "(windows set on validation images); off: every member always. Default: the run config's cascade.mode."
        ),
    ] = None,
    coarse: Annotated[
        Path | None,
        typer.Option(
            help="A single-member, single-tile run of the same data and image size (e.g. preset SM256): the bundle "
            "runs it first and only the tiles it finds suspicious through the tiled ensemble."
        ),
    ] = None,
) -> None:
    """Write one category of a run as a bundle: ONNX engines, FAISS indexes, a checked manifest."""
    from tilecore.export.identity import check_label
    from tilecore.export.tensorrt_build import TensorRTBuild, check_build_stack
    from tilecore.runtime.signing import load_private_key

    check_label(version, "--version")
    if cascade is not None and cascade not in ("auto", "off"):
        raise TilecoreError(f"--cascade {cascade}: expected auto or off")
    if name is not None:
        check_label(name, "--name")

    if sign is not None:
        load_private_key(sign)  # a bad key file gets its one line now, before torch loads

    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    precisions, plan_precisions = engine_table.split_export_precisions(precisions, tensorrt)
    asked = {"--workspace-gb": workspace_gb, "--max-batch": max_batch}
    asked = {flag: value for flag, value in {**asked, "--gpu-id": gpu_id}.items() if value not in (None, False)}
    if asked and not tensorrt:
        raise TilecoreError(f"{', '.join(asked)}: options of the TensorRT engine build; add --tensorrt")
    build = None
    if tensorrt:
        defaults = TensorRTBuild()
        build = TensorRTBuild(
            "fp16" in plan_precisions,
            "int8" in plan_precisions,
            defaults.workspace_gb if workspace_gb is None else workspace_gb,
            defaults.max_batch if max_batch is None else max_batch,
            defaults.gpu_id if gpu_id is None else gpu_id,
        )
        check_build_stack(build)  # a machine without the GPU stack gets its one line now, before torch loads
    from tilecore.export.bundle import export_run

    manifest = export_run(
        run, out, category, index, build, precisions, precision_floor, int8_max_error, sign, name=name, version=version,
        cascade=cascade, coarse=coarse,
    )  # fmt: skip
    engines = sorted(manifest.graphs)
    console.print(
        f"bundle written to {out}: {len(engines)} engine(s), "
        f"{sum(name.endswith('.faiss') for name in manifest.files)} index(es)"
        + (f", signed with {sign}" if sign is not None else "")
    )


@app.command()
def info(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `tilecore export`.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for machines.")] = False,
    trust: Annotated[Path | None, typer.Option(help="Also verify the signature with this Ed25519 public key.")] = None,
) -> None:
    """What a bundle is: name, version, fingerprints, members, tiling, thresholds, precisions, files, signature."""
    import json

    from tilecore.runtime.bundle_info import bundle_info, info_lines

    described = bundle_info(bundle, trust)
    typer.echo(json.dumps(described, indent=2) if json_out else "\n".join(info_lines(described)))


@app.command("run")
def run_bundle(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `tilecore export`.")],
    input: Annotated[str, typer.Argument(help="Image, folder, glob, list file (.txt), video file or camera index.")],
    out: Annotated[Path, typer.Option(help="Folder for results.jsonl, summary.json, overlays, masks.")] = Path(
        "predictions"
    ),
    device: Annotated[str, typer.Option(help=engine_table.device_help())] = "auto",
    gpu_id: Annotated[int, typer.Option(help="CUDA device for engines and FAISS indexes.")] = 0,
    precision: Annotated[str, typer.Option(help=engine_table.precision_help())] = "fp32",
    recheck: Annotated[
        str | None,
        typer.Option(
            help="With a reduced --precision: score again in fp32 when within this of the threshold; auto: "
            "the largest score change the export measured on validation."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Images scored together.")] = 4,
    threads: Annotated[int, typer.Option(help="CPU threads for engines and kNN (0: library default).")] = 0,
    streams: Annotated[
        int, typer.Option(help="OpenVINO inference streams run in parallel, sharing --threads (openvino only).")
    ] = 1,
    overlays: Annotated[
        bool, typer.Option(help="Write overlays: heat map, colour bar, score, label, threshold, mask outline.")
    ] = False,
    side_by_side: Annotated[
        bool, typer.Option(help="Overlays show the original on the left of the overlay (implies --overlays).")
    ] = False,
    masks: Annotated[bool, typer.Option(help="Write binary anomaly masks.")] = False,
    trust: Annotated[
        Path | None, typer.Option(help="Refuse the bundle unless it is signed by this Ed25519 public key.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out: score only the inputs not yet in results.jsonl.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the results of an earlier run in --out.")] = False,
    threshold: Annotated[
        float | None, typer.Option(help="Image threshold for this run instead of the bundle's (recorded).")
    ] = None,
    pixel_threshold: Annotated[
        float | None, typer.Option(help="Pixel (mask) threshold for this run instead of the bundle's (recorded).")
    ] = None,
    cascade: Annotated[
        str, typer.Option(help="auto: the bundle's early-exit cascade where it has one; off: every member.")
    ] = "auto",
    ray: Annotated[str | None, typer.Option(help=f"Score on a Ray cluster: {ADDRESS_HELP}.")] = None,
    ray_actors: Annotated[
        int, typer.Option(help="With --ray: actors scoring batches, one CPU each (the bundle at the same path).")
    ] = 2,
    ray_gpus: Annotated[
        float, typer.Option(help="With --ray: GPUs each actor holds (1 for --device cuda or tensorrt; 0.5 shares one).")
    ] = 0.0,
) -> None:
    """Score images with a bundle (no torch needed): one JSON line per image, a summary at the end."""
    from contextlib import ExitStack

    from tilecore.runtime.predictor import Predictor
    from tilecore.runtime.ray_cluster import ray_session
    from tilecore.runtime.run_stream import run_stream

    if batch < 1:
        raise TilecoreError(f"--batch {batch}: expected >= 1")
    if ray_actors < 1:
        raise TilecoreError(f"--ray-actors {ray_actors}: expected >= 1")
    if ray_gpus < 0:
        raise TilecoreError(f"--ray-gpus {ray_gpus:g}: expected >= 0")
    if resume and overwrite:
        raise TilecoreError("--resume and --overwrite: pick one (continue the earlier run, or replace it)")
    if cascade not in ("auto", "off"):
        raise TilecoreError(f"--cascade {cascade}: expected auto or off")
    options = dict(
        device=device, threads=threads, gpu_id=gpu_id, precision=precision, recheck=recheck, streams=streams,
        trust=trust, threshold=threshold, pixel_threshold=pixel_threshold, cascade=cascade == "auto",
    )  # fmt: skip
    predictor = Predictor(bundle, **options)  # opens and checks the bundle here, before any --ray work

    def show(record: dict) -> None:
        if "error" in record:
            console.print(
                f"[yellow]skipped[/] {escape(record['input'])}: {escape(record['error'])}",
                highlight=False,
                soft_wrap=True,
            )

    with progress_bar() as progress:
        task = progress.add_task("run: starting", total=None)

        def advance(running: dict) -> None:
            progress.update(task, completed=running["images"] + running["failed"], description=run_counts(running))

        overlays = overlays or side_by_side
        with ExitStack() as stack:
            scorer = None  # local: the driver's predictor scores
            if ray is not None:
                from tilecore.runtime.ray_run import ray_scorer

                cluster = stack.enter_context(ray_session(ray))
                # the actors open the same files, at absolute paths (ray_scorer resolves the bundle's)
                remote_options = {**options, "trust": trust.resolve() if trust else None}
                scorer = ray_scorer(cluster, bundle, ray_actors, remote_options, ray_gpus)
            summary = run_stream(
                predictor, input, out, batch, overlays, masks, show, resume, overwrite, advance, side_by_side, scorer
            )
    console.print(escape(run_summary(summary, out, overlays, masks)), highlight=False, soft_wrap=True)


def run_counts(summary: dict, prefix: str = "run: ") -> str:
    """run: 120 scored (3 anomalous), 2 failed, 11.8 images/s"""
    speed = summary["images_per_second"]
    rate = f", {speed:.3g} images/s" if speed else ""
    return f"{prefix}{summary['images']} scored ({summary['anomalous']} anomalous), {summary['failed']} failed{rate}"


def run_summary(summary: dict, out: Path, overlays: bool, masks: bool) -> str:
    """The last line of `tilecore run`: the counts, the speed, and where every output is."""
    where = [f"results in {out / 'results.jsonl'}", f"summary in {out / 'summary.json'}"]
    where += [f"{folder} in {out / folder}" for folder, asked in (("overlays", overlays), ("masks", masks)) if asked]
    providers = ", ".join(summary["providers"]) or "no provider"
    return f"{run_counts(summary, '')} on {providers}, {summary['seconds']:.1f} s; {'; '.join(where)}"


@app.command()
def bench(
    bundles: Annotated[list[Path], typer.Argument(help="Bundle folders; several compare setups in one run.")],
    device: Annotated[str, typer.Option(help=engine_table.bench_device_help())] = "cpu",
    precision: Annotated[str, typer.Option(help=engine_table.bench_precision_help())] = "fp32",
    batch: Annotated[str, typer.Option(help="Batch sizes for throughput, comma-separated.")] = "1,8,16",
    images: Annotated[Path | None, typer.Option(help="Folder of input images; omitted: synthetic ones.")] = None,
    duration: Annotated[float, typer.Option(help="Upper bound in seconds for each figure.")] = 10.0,
    min_images: Annotated[int, typer.Option(help="Images per figure (or until --duration).")] = 100,
    threads: Annotated[int, typer.Option(help="CPU threads for engines and kNN (0: library default).")] = 0,
    max_batch: Annotated[int, typer.Option(help="Tiles per engine call.")] = 16,
    streams: Annotated[str, typer.Option(help="OpenVINO inference streams, comma-separated: each is measured.")] = "1",
    run: Annotated[str, typer.Option(help="Run dir for --device pytorch (default: the bundle's source run).")] = "",
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and the plots.")] = Path("bench"),
    memory_sweep: Annotated[bool, typer.Option(help="Also measure memory vs resolution (needs torch).")] = False,
    sweep_sizes: Annotated[str, typer.Option(help="Resolutions for --memory-sweep.")] = "256,512,1024,2048",
    quick: Annotated[bool, typer.Option(help="A sub-minute smoke run: few images, short figures.")] = False,
    work: Annotated[Path, typer.Option(help="Folder for synthetic inputs and sweep bundles (reused).")] = Path(
        ".tilecore-bench"
    ),
    trust: Annotated[Path | None, typer.Option(help="Refuse any bundle not signed by this Ed25519 public key.")] = None,
) -> None:
    """Latency, throughput, stage costs, efficiency and memory of bundles, per backend and precision."""
    from tilecore.bench.plan import machine_description, parse_batches, parse_list, plan_jobs
    from tilecore.bench.protocol import QUICK, Protocol
    from tilecore.bench.report import write_report
    from tilecore.bench.run_bench import run_all

    protocol = QUICK if quick else Protocol(parse_batches(batch), duration, min_images, 3, max_batch)
    devices, precisions = parse_list(device, "--device"), parse_list(precision, "--precision")
    sizes = tuple(int(x) for x in parse_batches(sweep_sizes))
    stream_counts = parse_batches(streams, "--streams")
    jobs, notes = plan_jobs(
        bundles, devices, precisions, protocol, work, images, threads, run, 4 if quick else 16, stream_counts, trust
    )
    report: dict = {
        "machine": machine_description(),
        "threads": threads,
        "inputs": str(images) if images else "synthetic textures at each bundle's image size",
        "protocol": protocol.to_dict(),
        "notes": notes,
    }
    with progress_bar() as progress:
        task = progress.add_task("bench", total=len(jobs))

        def done(job, row: dict) -> None:
            progress.advance(task)
            if "error" in row:
                console.print(f"[yellow]not measured[/] {job.label} {job.device} {job.precision}: {row['error']}")

        report["rows"] = run_all(jobs, done)
        if memory_sweep:
            from tilecore.bench.memory_sweep import memory_sweep as sweep

            sweep_task = progress.add_task("memory vs resolution", total=2 * len(sizes))
            report["memory_sweep"] = sweep(work, sizes, threads, lambda row: progress.advance(sweep_task), progress)
    files = write_report(report, out)
    typer.echo((out / "bench.md").read_text())  # plain stdout: tables must not wrap at the terminal's width
    console.print(f"written to {out}: {', '.join(files)}")


@app.command()
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder to re-threshold (left unchanged).")],
    good_images: Annotated[str, typer.Argument(help="Known-good images from the line: folder, glob or list file.")],
    out: Annotated[Path, typer.Option(help="New bundle folder to create.")],
    target_fpr: Annotated[float, typer.Option(help="Most good images flagged, a fraction (needs 1/x images).")] = 0.01,
    pixel_quantile: Annotated[
        float | None, typer.Option(help="Pixel threshold: this quantile of their map pixels (default: the bundle's).")
    ] = None,
    sign: Annotated[Path | None, typer.Option(help="Sign the new bundle with this Ed25519 private key.")] = None,
    device: Annotated[str, typer.Option(help="Where to score: auto, cpu, cuda, openvino, ...")] = "auto",
) -> None:
    """New thresholds from good images (after a lighting or camera change), written as a new bundle."""
    from tilecore.runtime.recalibrate import recalibrate

    def skipped(name: str, reason: str) -> None:
        console.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", highlight=False, soft_wrap=True)

    outcome = recalibrate(bundle, good_images, out, target_fpr, pixel_quantile, sign, device, on_skip=skipped)
    t = outcome.manifest.thresholds
    record = t.recalibrated
    lines = [
        f"bundle written to {out}: image threshold {record.previous.image:.6g} -> {t.image:.6g} "
        f"({record.fpr:.4g} of {record.images} good images flagged, target {record.target_fpr:g}), "
        f"pixel threshold {record.previous.pixel:.6g} -> {t.pixel:.6g}; {len(outcome.skipped)} image(s) skipped",
    ]
    cascade, coarse = outcome.manifest.cascade, outcome.manifest.coarse
    if cascade is not None:
        how = "refit" if cascade.calibration_scores else "moved with the threshold (bundle without calibration scores)"
        exits = ", ".join(f"{s.exit_share:.0%}" for s in cascade.stages)
        lines.append(f"cascade windows {how} on {cascade.calibration_images} images: order {list(cascade.order)}, "
                     f"share leaving at each stage {exits}")  # fmt: skip
    if coarse is not None and coarse.gate.scores is not None:
        lines.append(f"tile gate refit on {coarse.gate.calibration_images} images: {coarse.gate.tile_share:.0%} of "
                     "their tiles run")  # fmt: skip
    if outcome.signed:
        lines.append(f"signed with {sign}")
    elif outcome.was_signed:
        lines.append(f"unsigned: {bundle}'s signature does not cover the new manifest; re-sign with --sign KEY")
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair (created; existing keys are never replaced).")],
) -> None:
    """Make an Ed25519 key pair for signed bundles: the private key signs (export --sign), the public one
    goes to the devices (run --trust)."""
    from tilecore.runtime.signing import generate_keypair

    private, public, fingerprint = generate_keypair(out)
    lines = (
        f"private key {private} (mode 0600; keep it on the signing machine, export --sign)",
        f"public key {public} (copy to the devices, run --trust); fingerprint {fingerprint}",
    )
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True)


def missing_extra(exc: ImportError) -> str | None:
    """The one line for a module of an extra that is not installed, or None for any other import failure."""
    module = (exc.name or "").split(".")[0]
    extra = MODULE_EXTRAS.get(module)
    if extra is None:
        return None
    words = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["data"] else words[:1]) or "this command"
    extras = [*COMMAND_EXTRAS.get(words[0] if words else "", ())]
    extras += [extra] if extra not in extras else []
    return (
        f"tilecore {command} needs the '{extra}' extra: pip install 'tilecore[{','.join(extras)}]' "
        f"(missing module {module})"
    )


def missing_module(argv: list[str]) -> ModuleNotFoundError | None:
    """The first module the command in `argv` needs that is not installed (None: all there, or --help)."""
    from importlib.util import find_spec

    words = [arg for arg in argv if not arg.startswith("-")]
    if not words or "--help" in argv:
        return None
    for module in COMMAND_MODULES.get(words[0], ()):
        if find_spec(module) is None:
            return ModuleNotFoundError(f"No module named {module!r}", name=module)
    return None


def main() -> None:
    log = logging.getLogger("tilecore")
    log.setLevel(logging.INFO)
    if console.is_terminal:
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    else:  # a log file: whole lines, no colours, no wrapping at 80 columns; StreamHandler flushes each one
        console.width = 100_000
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    try:
        if (missing := missing_module(sys.argv[1:])) is not None:
            raise missing
        app()
    except TilecoreError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ImportError as exc:  # a runtime-only install asked for a command of another extra
        if (message := missing_extra(exc)) is None:
            raise
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # a machine fault no command turned into a TilecoreError: still one line
        from tilecore.runtime.image_io import display_path  # any file name, printable

        name = exc.filename
        where = f": {display_path(name) if isinstance(name, str | bytes | Path) else name}" if name is not None else ""
        message = f"{exc.strerror or exc}{where}"
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        again = "re-run the same command"
        if sys.argv[1:2] == ["run"]:
            again = "run it again with --resume" + (" instead of --overwrite" if "--overwrite" in sys.argv else "")
        console.print(f"[bold red]interrupted[/]; finished parts are kept: {again} to go on")
        sys.exit(130)


if __name__ == "__main__":
    main()
