"""Development-only code, kept out of the installed package (importable from the checkout, as bench/ is): the
demo (`make demo`), the man-page and docs generator (`make docs`), and small random models of each
architecture for the tests and benchmarks."""
