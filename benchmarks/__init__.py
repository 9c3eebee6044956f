"""Side-by-side benchmarks: dicomnet against pynetdicom and DCMTK on 127.0.0.1.

Run from the repository root: ``python -m benchmarks.run`` (see benchmarks/README.md).
"""
