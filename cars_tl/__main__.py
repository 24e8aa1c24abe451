from cars_tl.cli import app

app()
