"""Entry point for gunicorn: ``gunicorn 'api:create_app()'`` works too."""

from api import create_app

app = create_app()
