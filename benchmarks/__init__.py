"""Benchmarks that race cellseg_pl against ``yolo segment train`` on the same data: ``python -m benchmarks.<name>``.

Run them from the repository root. Each driver is built only on public ``cellseg_pl`` functions; see docs/benchmarks.md
for what each one measures, the commands and the figures measured with them.
"""
