"""Independent pure-PyTorch implementation of the SD3 / SD3.5 stack.

Imports torch, safetensors, numpy, the standard library and ``regex`` only (``ftfy`` for the ``openai`` CLIP
tokenizer mode). Never the reference libraries: ``tests/test_layering.py`` enforces it.
"""
