"""``python -m calibrate``."""

from calibrate.cli import app

app()
