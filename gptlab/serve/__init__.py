"""Serving: an OpenAI-compatible HTTP API and a web chat page over one shared model.

* ``app.py``: ``create_app(backend, api_key=..., store=..., limits=...)`` (FastAPI) and ``Backend``
  (a run folder's model behind the engine's continuous-batching scheduler).
* ``store.py``: SQLite history (conversations, messages, thumbs, comparisons) and ``export_feedback``.
* ``static/``: the chat page (plain HTML/CSS/JS, works offline).
* ``commands.py``: ``gptlab serve`` and ``gptlab feedback export``.
"""
