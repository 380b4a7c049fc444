"""Reports: the tables and plots ``dgmr report`` (:mod:`.compare`, :func:`render_report`) and the
demo draw (:mod:`.tables`, :mod:`.plots`)."""
from .compare import render_report

__all__ = ["render_report"]
