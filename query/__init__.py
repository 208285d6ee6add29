"""Query layer: SQL over the store, correlate, transition, findings, charts and reports.

Every function returns a polars DataFrame (or an Altair chart) so notebooks and the CLI share it.
"""
