"""Side-by-side benchmarks of starpo against TRL (``python -m benchmarks.run``).

TRL is a benchmark-only dependency (``pip install -e '.[bench]'``); see BENCHMARKS.md.
"""
