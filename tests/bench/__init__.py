"""`make bench`: the performance issue's benchmark. Numbers are printed and written as JSON and
plots into `docs/perf/`; nothing here asserts a timing (see docs/perf/README.md)."""
