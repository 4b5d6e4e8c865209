"""Private machinery of ``attnpatch bench`` (see :mod:`attnpatch.bench`): timing helpers,
the benchmark suites, the results schema and the Markdown/PNG report.

``benchmarks/_timing.py`` re-exports :mod:`attnpatch._bench.timing` for the stand-alone scripts.
"""
