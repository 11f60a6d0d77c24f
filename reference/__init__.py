"""The lecture's reference code (makemore part 3).

The oracle of the tests and the baseline of the benchmarks.
"""
