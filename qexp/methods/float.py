"""Float baseline: plain training, the reference row of every table."""

from qexp.methods.base import Method


class Float(Method):
    name = "float"
