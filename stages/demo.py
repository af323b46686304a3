"""The whole pipeline in one command, on whatever Ray and storage the config points at."""
from __future__ import annotations

import time

from pipeline.config import Config, dump_config
from pipeline.models.planted import planted_note
from pipeline.storage import write_bytes_atomic
from stages import distill, evaluate, export, shard, teacher_cache
from stages.runtime import say


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    if note := planted_note(cfg.teacher.model):
        say(f"demo: the teacher {note}")
    write_bytes_atomic(cfg.under_root("config.yaml"), dump_config(cfg).encode(), cfg.storage.storage_options)
    manifest = shard.run(cfg)
    store = teacher_cache.run(cfg)
    distill.run(cfg)
    exported = ", ".join(export.run(cfg))
    report = evaluate.run(cfg)
    say(
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s\n"
        f"  config     {cfg.under_root('config.yaml')}\n"
        f"  shards     {manifest.url} ({manifest.num_images} images)\n"
        f"  targets    {store.url}\n"
        f"  student    {cfg.students_url}/{cfg.student.name}\n"
        f"  export     {exported}\n"
        f"  report     {cfg.eval_url}/report.md (its table is above)\n"
        + (f"  teacher    {note}\n" if note else "") +
        f"  tensorboard --logdir {cfg.storage.run_root}"
    )
    return report
