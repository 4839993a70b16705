from typer.testing import CliRunner

from ipolicy_cli.main import app


def run_cli(*args: str):
    """Run ``ipolicy`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
