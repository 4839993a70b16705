"""The ``ipolicy`` command line (Typer), a thin layer over ``internal_policy``."""
