from annotate.cli import app

app()
