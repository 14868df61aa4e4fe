"""Benchmarks: ``python -m bench [--quick]`` writes ``bench/results.json`` and ``bench/README.md``.

Every number is a ratio against a reference measured in the same process (interleaved and
repeated, medians), because the machines this runs on are shared and absolute timings are
noisy. Benchmarks report; they never assert speed (the test suite only smoke-tests the harness).
"""
