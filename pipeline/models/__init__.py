"""Models: building the frozen teacher and the register-carrying student from timm
(`vit`), CLIP image towers with dense joint-space features and the import of the authors'
CLIP students (`clip`), teachers with artifacts planted by construction (`planted`), the
training-free test-time-registers baseline, which finds register neurons and moves their
activation to an extra token (`register_neurons`), the import of the authors' DINOv2 students
(`reference_weights`), and exporting students in timm's hub format (`export`). Imports the top
level of `pipeline` and `data`.
"""
