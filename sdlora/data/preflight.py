"""`sdlora dataset check`: decode every image and say, before any model loads, what will and won't be trained on.

Training runs the same check and uses its result (sizes, content hashes, buckets), so what the report calls usable
is exactly what trains.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdlora.config import DataSection
from sdlora.data.buckets import Bucket, assign_bucket, make_buckets, nearest_bucket
from sdlora.data.captions import build_caption, split_tags
from sdlora.data.images import ImageLoadError, load_rgb
from sdlora.data.regularization import RegularizationMix
from sdlora.data.sources import DatasetError, ImageRecord, scan_sources

log = logging.getLogger(__name__)

CLIP_TOKEN_LIMIT = 77  # including the begin and end tokens
_APPROX_TOKENS = re.compile(r"[a-z]+|\d|[^\sa-z\d]")


def approximate_token_count(text: str) -> int:
    """CLIP-like count without a tokenizer: words, single digits and punctuation, plus begin/end tokens."""
    return len(_APPROX_TOKENS.findall(text.lower())) + 2


@dataclass(frozen=True)
class TokenCounter:
    count: Callable[[str], int]
    limit: int
    name: str
    cut_off: Callable[[str], str] | None = None  # the words of a too-long caption that the text encoder never sees


APPROXIMATE = TokenCounter(approximate_token_count, CLIP_TOKEN_LIMIT, "approximate")


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str
    detail: str


@dataclass
class PreflightReport:
    sources: list[str]
    resolution: int
    bucketing: bool
    found: int
    records: list[ImageRecord]  # usable, in training order; each with size and content hash
    buckets: list[Bucket]  # the (height, width) each usable record trains at
    skipped: list[Finding]
    warnings: list[Finding]
    tag_frequency: dict[str, dict[str, int]]
    items_per_epoch: int
    batches_per_epoch: int
    steps_per_epoch: float
    token_counter: str
    settings_files: list[str] = field(default_factory=list)
    token_limit: int = CLIP_TOKEN_LIMIT
    resolution_note: str = ""  # where `resolution` came from, when the caller knows more than the config says
    unsupported: int = 0  # files that are not images (also in `skipped`, and in `files_found`)
    batch_memory: int = 0  # bytes of RAM the data pipeline needs at least (see `batch_memory_bytes`)
    batch_memory_why: str = ""

    @property
    def files_found(self) -> int:
        """Every file looked at: usable + skipped, images or not."""
        return self.found + self.unsupported

    @property
    def usable(self) -> int:
        return len(self.records)

    def bucket_histogram(self) -> dict[str, int]:
        counts = Counter(self.buckets)
        return {f"{w}x{h}": counts[(h, w)] for h, w in sorted(counts)}

    def to_json(self) -> dict:
        return {
            "sources": self.sources, "resolution": self.resolution, "bucketing": self.bucketing,
            "files_found": self.files_found, "images_found": self.found, "images_usable": self.usable,
            "batch_memory_bytes": self.batch_memory,
            "usable": [str(r.path) for r in self.records],
            "skipped": [f.__dict__ for f in self.skipped], "warnings": [f.__dict__ for f in self.warnings],
            "buckets": self.bucket_histogram(), "tag_frequency": self.tag_frequency,
            "items_per_epoch": self.items_per_epoch, "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "token_counter": self.token_counter,
            "token_limit": self.token_limit, "resolution_note": self.resolution_note,
            "settings_files": self.settings_files,
        }


def batch_memory_bytes(batch_size: int, side_pixels: int, largest_source_pixels: int, num_workers: int) -> tuple[int, str]:
    """A lower bound on the RAM the data pipeline holds, and how it was counted: each image of a batch as decoded
    uint8 RGB and as a float32 tensor (3 x 5 bytes a pixel), for every batch in flight (the one training and
    torch's DataLoader default of 2 prefetched per worker), plus the largest source image decoded once per worker.
    The model's own memory comes on top; this is what a resolution or batch size that can never fit runs into."""
    in_flight = 1 + 2 * num_workers
    total = in_flight * batch_size * side_pixels * 15 + max(1, num_workers) * largest_source_pixels * 3
    return total, f"{in_flight} batch(es) of {batch_size} image(s) of {side_pixels} pixels in flight"


def available_ram() -> int | None:
    """Bytes the kernel says a process can still get without swapping (Linux MemAvailable), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _inspect(path: Path, background: tuple[int, int, int]) -> tuple[str, tuple[int, int] | ImageLoadError]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "", ImageLoadError(path, f"cannot read: {exc}", "corrupt")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = load_rgb(path, background)
    except ImageLoadError as exc:
        return digest, exc
    return digest, (image.height, image.width)


def check(
    data: DataSection, batch_size: int = 1, gradient_accumulation: int = 1, num_replicas: int = 1,
    tokens: TokenCounter | None = None, workers: int = 4, resolution_note: str = "",
) -> PreflightReport:
    """Decode and hash every image of every source; sort them into usable, skipped and warned-about. `tokens`
    counts caption tokens as the base's tokenizer does (default: estimated against CLIP's 77); `resolution_note`
    says where `data.resolution` came from, for the report."""
    scan = scan_sources(data.resolved_sources())
    if data.cache_text_embeddings:
        for record in scan.records:
            if record.captions.varies:
                option = record.captions.varying_fields()[0]
                raise DatasetError(
                    f"{record.path.parent}: a dataset.toml there sets captions.{option}, which cannot be combined "
                    f"with data.cache_text_embeddings: drop one of them"
                )
    # Pillow releases the GIL while decoding, so a few threads make a large folder check several times faster.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        inspected = list(pool.map(lambda r: _inspect(r.path, data.background), scan.records))
    bucket_cfg = data.bucketing
    buckets_available = make_buckets(
        data.resolution, bucket_cfg.step, bucket_cfg.min_side or max(bucket_cfg.step, data.resolution // 2),
        bucket_cfg.max_side or data.resolution * 2, bucket_cfg.max_aspect,
    ) if bucket_cfg.enabled else []
    tokens = tokens or APPROXIMATE
    skipped = [Finding(str(p), "unsupported", f"not an image sdlora reads ({p.suffix or 'no extension'})")
               for p in scan.unsupported]
    warnings, records, buckets, seen = [], [], [], {}
    tags: dict[str, Counter] = {}
    for record, (digest, result) in zip(scan.records, inspected):
        where = str(record.path)
        if isinstance(result, ImageLoadError):
            skipped.append(Finding(where, result.kind, result.reason))
            continue
        if digest in seen:
            skipped.append(Finding(where, "duplicate", f"same content as {seen[digest]}"))
            continue
        seen[digest] = where
        height, width = result
        if bucket_cfg.enabled:
            bucket = assign_bucket(result, buckets_available, bucket_cfg.step, bucket_cfg.upscale)
            if bucket is None:
                skipped.append(Finding(where, "too_small", f"{width}x{height} is smaller than one {bucket_cfg.step} "
                                       "px bucket side"))
                continue
            if bucket not in buckets_available:
                full_size = nearest_bucket(result, buckets_available)
                warnings.append(Finding(where, "small", f"{width}x{height} is smaller than its {full_size[1]}x"
                                        f"{full_size[0]} bucket: trains at {bucket[1]}x{bucket[0]} "
                                        "(data.bucketing.upscale=true enlarges it instead)"))
        else:
            bucket = (data.resolution, data.resolution)
            if min(height, width) < data.resolution:
                warnings.append(Finding(where, "small", f"{width}x{height} is smaller than the training resolution "
                                        f"{data.resolution}: it will be upscaled"))
        if record.caption_status in ("missing", "empty"):
            warnings.append(Finding(where, f"caption_{record.caption_status}",
                                    f"no caption: uses the default caption {record.caption!r}"
                                    if record.caption_status == "missing"
                                    else f"caption is empty: uses the default caption {record.caption!r}"))
        fixed = record.captions.model_copy(update={"dropout": 0.0, "tag_dropout": 0.0, "shuffle_tags": False})
        full = build_caption(record.caption, fixed, random.Random(0))
        length = tokens.count(full)
        if length > tokens.limit:
            lost = f"{_clip(tokens.cut_off(full))!r} is cut off" if tokens.cut_off else "the end is cut off"
            warnings.append(Finding(where, "caption_long", f"{length} tokens, over the text encoder's limit of "
                                    f"{tokens.limit}: {lost}"))
        tags.setdefault(record.source, Counter()).update(split_tags(record.caption))
        records.append(replace(record, size=result, content_hash=digest))
        buckets.append(bucket)
    # Items per epoch by what a batch must not mix (data/buckets.py's `Group`): the bucket, and the adapter weight
    # when images train at several; training items, then regularization slots (at weight 1.0).
    weighted = any(record.adapter_weight != 1.0 for record in records)

    def group(bucket, weight=1.0):
        return (bucket, weight) if weighted else bucket

    per_bucket = Counter()
    for record, bucket in zip(records, buckets):
        per_bucket[group(bucket, record.adapter_weight)] += 0 if record.regularization else record.repeats
    pool = [i for i, record in enumerate(records) if record.regularization for _ in range(record.repeats)]
    if pool:
        mix = RegularizationMix(pool, buckets, sum(per_bucket.values()), data.regularization.ratio, 0)
        per_bucket.update({group(bucket): count for bucket, count in mix.per_bucket.items()})
    items = sum(per_bucket.values())
    global_batch = batch_size * num_replicas
    if bucket_cfg.enabled or weighted:
        batches = sum(math.ceil(n / global_batch) for n in per_bucket.values() if n)
    else:
        batches = items // global_batch
    side = max((h * w for h, w in buckets), default=data.resolution ** 2)
    largest_source = max((r.size[0] * r.size[1] for r in records), default=0)
    memory, memory_why = batch_memory_bytes(batch_size, side, largest_source, data.num_workers)
    return PreflightReport(
        unsupported=len(scan.unsupported), batch_memory=memory, batch_memory_why=memory_why,
        sources=[str(s.path) for s in data.resolved_sources()], resolution=data.resolution,
        bucketing=bucket_cfg.enabled, found=len(scan.records), records=records, buckets=buckets, skipped=skipped,
        warnings=warnings, tag_frequency={k: dict(v.most_common()) for k, v in tags.items()}, items_per_epoch=items,
        batches_per_epoch=batches, steps_per_epoch=batches / gradient_accumulation, token_counter=tokens.name,
        settings_files=[str(p) for p in scan.settings_files], token_limit=tokens.limit,
        resolution_note=resolution_note,
    )


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def log_summary(report: PreflightReport, check_command: str = "sdlora dataset check") -> None:
    """What a training run prints about its data: every skipped file by name, and how many warnings there are.
    `check_command`: the `sdlora dataset check` that lists them, spelt so that it runs as printed."""
    for finding in report.skipped:
        log.warning("skipping %s (%s): %s", finding.path, finding.kind, finding.detail)
    kinds = Counter(f.kind for f in report.warnings)
    if kinds:
        log.warning("dataset warnings: %s (run `%s` for the list)",
                    ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())), check_command)
    missing = [f.path for f in report.warnings if f.kind == "caption_missing"]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%d image(s) have no caption; using the default caption: %s", len(missing), shown)
    weights = Counter(r.adapter_weight for r in report.records if not r.regularization)
    log.info("dataset: %d of %d image(s) usable, %d item(s) per epoch with repeats, %d batch(es) per epoch%s%s",
             report.usable, report.found, report.items_per_epoch, report.batches_per_epoch,
             f", buckets {report.bucket_histogram()}" if report.bucketing else "",
             ", images by adapter weight " + ", ".join(f"{w:g}: {n}" for w, n in sorted(weights.items()))
             if set(weights) != {1.0} else "")


def require_usable(report: PreflightReport, batch_size: int, num_replicas: int = 1,
                   check_command: str = "sdlora dataset check") -> None:
    """Stop before any model loads when there is nothing (or too little) to train on."""
    where = report.sources[0] if len(report.sources) == 1 else f"{len(report.sources)} sources"
    if not report.found:
        raise DatasetError(f"data.path: no images in {where} (looked for .jpg, .jpeg, .png, .webp, .bmp in all "
                           "subfolders)")
    if not report.records:
        first = report.skipped[0]
        raise DatasetError(
            f"data.path: none of the {report.found} image(s) in {where} can be used; first problem: "
            f"{first.path}: {first.detail}; run `{check_command}` to see them all"
        )
    available = available_ram()
    if available is not None and report.batch_memory > available:
        raise DatasetError(
            f"data.resolution {report.resolution} with train.batch_size {batch_size}: the data alone needs at least "
            f"{report.batch_memory / 2**30:.1f} GiB of RAM ({report.batch_memory_why}), and {available / 2**30:.1f} "
            "GiB is available; lower data.resolution, train.batch_size or data.num_workers")
    if not report.bucketing and report.items_per_epoch < batch_size * num_replicas:
        raise DatasetError(
            f"train.batch_size: {report.items_per_epoch} usable image(s) (with repeats) cannot fill one batch of "
            f"{batch_size} x {num_replicas} process(es); lower the batch size or add images"
        )


def _short(path: str, roots: list[str]) -> str:
    for root in roots:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            continue
    return path


def _rows(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return []
    widths = [min(48, max(len(str(row[i])) for row in [header, *rows])) for i in range(len(header) - 1)]
    lines = ["", title]
    for row in [header, *rows]:
        cells = [str(cell)[:width].ljust(width) for cell, width in zip(row, widths)]
        lines.append("  " + "  ".join([*cells, str(row[-1])]))
    return lines


def _capped(findings: list[Finding], roots: list[str], per_kind: int) -> list[tuple[str, str, str]]:
    """At most `per_kind` rows of each kind, then one 'and N more' row (the JSON report lists them all)."""
    rows, shown, total = [], Counter(), Counter(f.kind for f in findings)
    for finding in findings:
        shown[finding.kind] += 1
        if shown[finding.kind] <= per_kind:
            rows.append((finding.kind, _short(finding.path, roots), finding.detail))
        elif shown[finding.kind] == total[finding.kind]:
            rows.append((finding.kind, f"... and {total[finding.kind] - per_kind} more", ""))
    return rows


def _counter_words(name: str) -> str:
    if name == "tokenizer":
        return "the base's own tokenizer"
    return f"the {name} counter (no tokenizer of the base is available locally)"


def _over(needed: int) -> str:
    available = available_ram()
    if available is None or needed <= available:
        return ""
    return f", more than the {available / 2**30:.1f} GiB available: training will refuse it"


def format_table(report: PreflightReport, top_tags: int = 10, per_kind: int = 8) -> str:
    """The human-readable report: totals, skipped files, warnings, buckets, tags, epoch size."""
    roots = report.sources
    lines = [
        f"dataset check: {', '.join(roots)}",
        f"  files found {report.files_found} ({report.found} image(s), {report.unsupported} other), "
        f"usable {report.usable}, skipped {len(report.skipped)}"
        f" ({', '.join(f'{k} {v}' for k, v in sorted(Counter(f.kind for f in report.skipped).items())) or 'none'})",
        f"  resolution {report.resolution}"
        + (f" ({report.resolution_note})" if report.resolution_note else "")
        + f", bucketing {'on' if report.bucketing else 'off'}",
        f"  caption tokens counted with {_counter_words(report.token_counter)}, limit {report.token_limit}",
        f"  memory: the data needs at least {report.batch_memory / 2**20:.1f} MiB of RAM ({report.batch_memory_why})"
        + _over(report.batch_memory),
    ]
    if report.settings_files:
        lines.append(f"  folder settings: {', '.join(_short(p, roots) for p in report.settings_files)}")
    lines += _rows("Skipped (not trained on)", ("kind", "file", "why"), _capped(report.skipped, roots, per_kind))
    lines += _rows("Warnings (trained on)", ("kind", "file", "detail"), _capped(report.warnings, roots, per_kind))
    lines += _rows("Buckets", ("WxH", "images"), list(report.bucket_histogram().items()))
    for source, counts in report.tag_frequency.items():
        shown = list(counts.items())[:top_tags]
        lines += _rows(f"Top tags in {source} ({len(counts)} distinct)", ("tag", "count"), shown)
    steps = report.steps_per_epoch
    lines += ["", f"Epoch: {report.items_per_epoch} items with repeats -> {report.batches_per_epoch} batches -> "
              f"{steps:g} optimizer steps"]
    return "\n".join(lines)
