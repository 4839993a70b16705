"""The ``ipolicy`` command line: a thin layer over ``internal_policy``'s public API (see ``ipolicy_cli.main``; installed under that name from the cli/ folder)."""
