"""Data: sources (hub schemas -> canonical rows), tokenization and packing.

See :mod:`starpo.canonical` for the one row shape everything downstream uses and
:mod:`starpo.data.sources` for how datasets are read into it.
"""
