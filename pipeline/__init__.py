"""PH-Reg pipeline library: models, test-time augmentation, storage and data."""
