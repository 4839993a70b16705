"""The ``ipolicy`` command line: a thin layer over ``internal_policy``'s public API (see ``cli.main``)."""
