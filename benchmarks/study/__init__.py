"""The PD-vs-colocated study (entry point: benchmarks/pd_vs_colocated.py), split by concern:
settings -> measure (live servers) and analysis (numbers) -> report (pictures, tables).
`analysis` and `report` never import `measure`, so `--reanalyse` needs no server code.
"""
