"""``python -m data_manifest``."""

from data_manifest.cli import app

if __name__ == "__main__":
    app()
