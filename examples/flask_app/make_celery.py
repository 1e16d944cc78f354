"""The Celery app of the Flask app, as in Flask's Celery guide.

Workers: ``celery -A make_celery worker -n w1@%h --max-sessions 4``.
"""

from flaskapp import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
