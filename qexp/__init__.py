"""qexp: an experiment runner for quantized neural-network training research."""

__version__ = "0.1.0"
