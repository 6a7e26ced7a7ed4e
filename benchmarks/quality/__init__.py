"""Quality benchmark: held-out accuracy of pruned seq_bn adapters vs kept fraction.

Entry point: ``benchmarks.quality.run.main(argv)`` (``python -m benchmarks.quality.run``).
"""
