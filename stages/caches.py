"""Inspect target stores: `list` what exists under a cache root, `verify` one store."""
from __future__ import annotations

import ray

from pipeline.config import Config
from pipeline.data.manifest import Manifest
from pipeline.errors import PipelineError
from pipeline.models.vit import describe_teacher
from pipeline.targets.store import TargetStore, list_stores, locate_store, store_spec
from pipeline.targets.store_check import check_layout, check_unit
from stages.runtime import init_ray, progress, say


@ray.remote(num_cpus=1)
def _check_units(store: TargetStore, units: list) -> list[str]:
    problems = []
    for unit in units:
        problems += check_unit(store, unit, store.marker(unit.id))
    return problems


def verify(cfg: Config) -> list[str]:
    """Check the store against its manifest; raise with every problem found."""
    so = cfg.storage.storage_options
    manifest = Manifest.load(cfg.cache_shards_url, so)
    spec = store_spec(cfg.tta, cfg.cache, describe_teacher(cfg.teacher, so), manifest)
    store = locate_store(spec, cfg.cache_root, manifest, so, cfg.distill.store)
    problems = check_layout(store, manifest)
    done = store.completed()  # one listing, not one per unit
    units = [u for u in manifest.units() if u.id in done]
    if units:
        init_ray()
        batches = [units[i:i + 16] for i in range(0, len(units), 16)]
        pending = [_check_units.remote(store, b) for b in batches]
        bar = progress(len(units), "verify", "unit")
        for batch, ref in zip(batches, pending):
            problems += ray.get(ref)
            bar.update(len(batch))
        bar.close()
    if problems:
        raise PipelineError(f"store {store.url} failed verification ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    say(f"verify: {store.url} is complete and consistent: {manifest.num_images} images in {len(units)} units, "
        f"{'targets and crops' if store.has_crops else 'targets only (no crops: students decode the images)'}")
    return problems


def list_caches(cfg: Config) -> list[dict]:
    """One line per store under the cache root: its settings and how complete it is."""
    so = cfg.storage.storage_options
    rows = []
    for store in list_stores(cfg.cache_root, so):
        spec, meta = store.spec, store.attrs
        try:
            total = len(Manifest.load(meta["manifest"], so).units())
        except PipelineError:
            total = None
        done = len(store.completed())
        t = spec.teacher
        rows.append({
            "fingerprint": spec.fingerprint, "model": t["model"], "weights": t["weights"], "img_size": t["img_size"],
            "grid": t["grid"], "counts": spec.counts, "shift_frac": spec.shift_frac, "flip": spec.flip, "seed": spec.seed,
            "dtype": spec.dtype, "variants": spec.variants, "crop": spec.crop, "corpus": spec.corpus_id,
            "crops": store.has_crops, "units_done": done, "units_total": total, "manifest": meta["manifest"],
        })
    if not rows:
        say(f"list: no target stores under {cfg.cache_root}")
    for r in rows:
        state = f"{r['units_done']}/{r['units_total']} units" if r["units_total"] is not None else f"{r['units_done']} units (manifest unreachable)"
        say(f"{r['fingerprint']}  {r['model']} @ {r['img_size'][0]}x{r['img_size'][1]} (grid {r['grid'][0]}x{r['grid'][1]}), "
            f"{r['counts']} views, shift {r['shift_frac']}, flip {r['flip']}, seed {r['seed']}, {r['dtype']}, "
            f"V={r['variants']} ({r['crop']}), {'crops stored' if r['crops'] else 'no crops'}, corpus {r['corpus']}: {state}\n"
            f"    weights {r['weights']}")
    return rows
