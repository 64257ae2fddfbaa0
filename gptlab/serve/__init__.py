"""Serving: an OpenAI-compatible HTTP API and a web chat page over one shared model.

* ``app.py``: ``create_app(backend, api_key=..., store=..., limits=..., hosts=...)`` assembles the rest.
* ``openai_api.py``: the ``/v1`` router; ``web.py``: the page at ``/`` and its ``/api`` router.
* ``protocol.py``: OpenAI-shaped errors, limits, request validation.
* ``backend.py``: ``Backend`` (a run folder's model behind the continuous-batching scheduler), prompt
  fitting, and draining the scheduler from asyncio.
* ``guard.py``: Host check, API key, same-origin + CSRF for the page, body limit.
* ``store.py``: SQLite history (conversations, messages, thumbs, comparisons) and ``export_feedback``.
* ``static/``: the chat page (plain HTML/CSS/JS, works offline).
* ``commands.py``: ``gptlab serve`` and ``gptlab feedback export``.
"""
