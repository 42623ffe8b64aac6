"""The frozen CLIP side: loading a backbone (or pretraining the demo one), and embedding
images and class names with it.
"""
