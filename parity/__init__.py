"""Comparison engine: capture, layer maps, metrics, flags, reports and the ``sd3parity`` command line.

The only package that imports both ``impl`` and the reference libraries and knows both naming schemes.
"""
