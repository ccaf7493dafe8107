"""`medmerge.merge`: a config and its local input models in, a verified model folder out."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import ConfigError, MedmergeError
from ..io.writer import OutTensor, ShardedWriter, atomic_output_dir, check_output, check_space, output_path
from ..io.writer import shard_size as shard_bytes
from ..runtime import resolve_device
from .config import MergeConfig, parse_config
from .compute import plan_globals
from .execute import StreamStats, stream_merge
from .plan import MergePlan, build_plan, input_refs, open_models
from .provenance import copy_support_files, input_hashes, output_model_config, write_model_config, write_provenance
from .verify import ConfigShapes, VerifyReport, verify_plan

POST_MERGE_SAMPLE = 4  # tensors recomputed by the cheap check after every merge


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    stats: StreamStats
    verification: Optional[VerifyReport] = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """What the merge did, in a few lines (what `medmerge merge` prints)."""
        s = self.stats
        lines = [f"merged {s.tensors} tensors with [bold]{self.plan.method.spec.name}[/] into {self.out} "
                 f"({s.bytes_written / 1e6:.1f} MB in {s.seconds:.2f}s)"]
        if self.verification is not None:
            worst = max((c.max_abs for c in self.verification.checked), default=0.0)
            lines.append(f"verified {len(self.verification.checked)} recomputed tensors: largest abs error {worst:.3g}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def check_threads(threads: object) -> int:
    """`threads` when it is a positive whole number; otherwise a ConfigError saying what to pass."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads (--threads) must be a positive whole number of CPU threads, got {threads!r}; "
                          "leave it out to use torch's default")
    return threads


def load_plan(
    config: Union[MergeConfig, dict, str, Path],
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> MergePlan:
    """Parse and check a config against its input folders (headers only, no tensor data)."""
    relative_to = None
    if isinstance(config, (str, Path)) and str(config).endswith((".yml", ".yaml")):
        relative_to = Path(config).resolve().parent
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    refs, _ = input_refs(cfg)
    models = open_models(refs, allow_pickle=allow_pickle, relative_to=relative_to)
    return build_plan(cfg, models, trust_remote_code=trust_remote_code, relative_to=relative_to)


def merge(
    config: Union[MergeConfig, dict, str, Path],
    out: Union[str, Path],
    *,
    force: bool = False,
    shard_size: Union[int, str] = "5GB",
    device: str = "cpu",
    threads: Optional[int] = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    verify: bool = True,
    progress: bool = True,
    extra_files: Optional[dict[str, str]] = None,
) -> MergeResult:
    """Merge to `out` (sharded safetensors, config, tokenizer, medmerge.yml, README.md).

    Output goes to a temporary folder beside `out` and is moved into place only
    after it was written and checked; an existing `out` needs `force=True`.
    `extra_files` ({name: text}) are written into the folder before it is moved into place.
    """
    out = output_path(out)
    size = shard_bytes(shard_size)
    check_output(out, force)
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    dev = torch.device(resolve_device(device))
    plan = load_plan(config, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    inputs = [getattr(m, "path", None) for m in plan.models]
    check_output(out, force, inputs)  # never is, holds or lies inside an input model: --force would delete it
    check_space(out, sum(OutTensor(tp.name, tp.out_dtype, tp.shape).nbytes for tp in plan.tensors))
    # Side work that overlaps the merge: input hashes for the record, and the shapes
    # transformers will expect from the output config.json (for the post-merge check).
    side: dict = {}
    hasher = threading.Thread(target=lambda: side.update(hashes=input_hashes(plan)), daemon=True)
    hasher.start()
    shaper = threading.Thread(
        target=lambda: side.update(shapes=ConfigShapes.from_config(output_model_config(plan))), daemon=True
    )
    if verify:
        shaper.start()
    plan_globals(plan, dev, progress=progress)  # whole-model statistics first (PCB), with their own progress bar
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardedWriter(tmp, [OutTensor(tp.name, tp.out_dtype, tp.shape) for tp in plan.tensors], size)
        stats = stream_merge(plan, writer, device=dev, progress=progress)
        writer.close()
        write_model_config(plan, tmp)
        tokenizer_notes = copy_support_files(plan, tmp)
        hasher.join()
        write_provenance(plan, tmp, side["hashes"], stats={
            "seconds": round(stats.seconds, 3), "bytes_written": stats.bytes_written,
            "device": str(dev), "threads": torch.get_num_threads(),
        })
        report = None
        if verify:
            shaper.join()
            report = verify_plan(
                plan, tmp, max_tensors=POST_MERGE_SAMPLE, check_all_finite=False, seed=plan.seed,
                config_shapes=side["shapes"],
            )
            if not report.ok:
                raise MedmergeError("verification of the merge failed: " + "; ".join(
                    report.problems + [f"{c.name}: max abs error {c.max_abs:.3g}" for c in report.checked if not c.ok]))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    notes = [f"{len(plan.ignored_tensors)} tensor(s) only in non-reference models were ignored"] if plan.ignored_tensors else []
    notes += tokenizer_notes
    return MergeResult(out=out, plan=plan, stats=stats, verification=report, notes=notes)
