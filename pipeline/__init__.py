"""PH-Reg pipeline library.

Layers, lowest first; a module imports only from its own layer and the ones below it
(`tests/test_layout.py` enforces this):

- `config`, `storage`, `errors`, `placement`, `tracking`: the run's typed config, fsspec I/O,
  the error types, how many workers a cluster can place, and TensorBoard/MLflow logging.
- `data`: images, shards, manifests, the sample corpus.
- `models`: teacher and student ViTs, planted-artifact teachers, export.
- `targets`: test-time augmentation, computing targets, the Zarr target store.
- `training` (distillation: pairs, losses, the workers' loop, checkpoints) and `evaluation`:
  both build on the layers above, never on each other.
"""
