"""Quantization methods: one file per method, each a :class:`~qexp.methods.base.Method`.

``configs/method/`` is the registry: a method is added by a YAML file whose ``_target_`` names its
class. The trainer calls the hooks and never branches on a method's name.
"""
