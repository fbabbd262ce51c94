"""Pure quantization math (grids, rounding, straight-through functions) and layer injection helpers."""
