"""Evaluation: what evaluate's Ray tasks compute (`tasks`), artifact and fidelity metrics
(`metrics`), linear probes (`probes`, ridge; `trained_probes`, the paper's trained heads) on
labeled sets (`labeled`), zero-shot open-vocabulary
segmentation with CLIP-space features (`zeroshot`), baselines measured beside
the student (`baselines`), pictures (`figures`) and the report text (`report`). Imports the
top level of `pipeline`, `data`, `models` and `targets`; never `training`.
"""
