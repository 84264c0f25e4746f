"""The admin page (docs/admin.md): what the process saw, for people and as JSON.

``recent.py`` keeps the last aggregates, ``rolling.py`` each upstream's last minute, ``app.py``
serves both; ``static/`` holds the page itself (no CDN, nothing fetched from elsewhere).
"""
