"""Distillation: (image, target) pairs in epoch order (`pairs`), the loss and learning
rate schedule (`losses`) and student checkpoints (`checkpoint`). Imports the top level of
`pipeline`, `data`, `models` and `targets`; never `evaluation`.
"""
