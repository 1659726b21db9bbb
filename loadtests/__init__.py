"""Load tests and the benchmark harness (`make bench`). Never imported by tests/."""
