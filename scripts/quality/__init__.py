"""The SMoA vs LoRA vs HiRA study behind docs/RESULTS.md (`scripts/reproduce_quality.py`).

protocol.py fixes what is run (methods, rates, seeds, steps); datasets.py writes the
splits; runs.py trains and measures; stats.py aggregates; report.py renders
RESULTS.md from template.md and draws the plot.
"""
