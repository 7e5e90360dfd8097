from relexd.cli import app

app()
