"""Quality benchmark: held-out accuracy of pruned seq_bn adapters vs kept fraction.

Run it from a source checkout (it is not installed with the package):
``python -m benchmarks.quality --help``; in code, ``benchmarks.quality.run.main(argv)``.
"""
