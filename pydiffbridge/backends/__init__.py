"""Engines behind the one API: torch (native), scipy, julia. See base.py."""
