"""Each benchmark's tables and plots, generated from its JSON in docs/results/.

One module per benchmark, named like it: ``table(report)`` returns the markdown the
documents show between the benchmark's markers (a test regenerates every one and
compares), ``write_tables(report)`` puts it there, and ``plot`` draws the figure where
there is one. A benchmark script measures and saves its JSON; it never formats.
"""
