"""Where a pipeline's summary lands: written by :func:`m2d2.tracking.write_pipeline_summary`, read by ``m2d2 summary``.

A module of its own (standard library only) so that the writer, low in the package, and the command line, at the
top, share the name without the writer importing the command line.
"""

SUMMARY_FILE = "latest-summary.json"
