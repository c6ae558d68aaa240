"""Tests of the demo project (``examples/demo``): its views, its transactions, its server.

``tests/settings.py`` puts ``examples/demo`` on ``sys.path`` and adds the demo's
``blog`` app to ``INSTALLED_APPS``; the URLs come from the demo's own
``demosite.urls`` (``override_settings`` in each test class).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo"
