"""Denoised teacher targets: test-time augmentation math (`tta`), running the teacher over
units of images (`teacher_targets`), the Zarr v3 target store (`store`), its integrity
checks (`store_check`) and the writer lease (`lease`). Imports the top level of
`pipeline`, `data` and `models`.
"""
