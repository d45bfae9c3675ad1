"""Benchmarks that print numbers (never assertions): ``python -m rl_mtl.bench {aggregators,train}``.

Timings are medians over interleaved rounds and ratios are taken within one run.
"""
