"""WAGE (Wu et al. 2018): the method hooks, its number formats, layers and the integer-only export."""

from qexp.methods.wage.method import Wage

__all__ = ["Wage"]
