"""Adapter layouts shared by the MLX (`convert/`) and PyTorch (`torch/`) sides.

Framework-neutral (NumPy and JSON): module names across frameworks, PEFT
directory I/O and config parsing, the authors' SMoA layout and its orders.
`convert/` and `torch/` both build on this package and never import each other.
"""
