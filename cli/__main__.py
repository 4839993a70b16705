"""``python -m ipolicy_cli``: the ``ipolicy`` command, for environments without the console script on PATH."""

from .main import app

app(prog_name="ipolicy")
