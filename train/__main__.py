from train.cli import app

app()
