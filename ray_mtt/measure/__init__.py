"""The benchmark harness: time, peak memory, FLOPs and a phase profile of one distillation iteration.

It runs core/'s own iteration (`core.distill.run_iteration`) on random content of a shipped config's
shapes; `python -m ray_mtt.bench` (cli/bench.py) is its command line. Needs only torch, so it runs on
a bare GPU box; it imports core, never scale or cli.
"""
