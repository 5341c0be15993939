"""Benchmark commands (`megagpt bench data|train`): the top layer beside the CLI; they may import megagpt, data_prep
and kernels, and nothing imports them. The kernel benchmark lives with the kernels (kernels/bench.py)."""
