"""The ``featattn`` command line (``featattn demo``, ``featattn bench``; also
``python -m featattn``): the parser and commands in :mod:`.app`, the MQAR demo in :mod:`.demo`,
the backend benchmark in :mod:`.bench`.  Nothing in the core ``featattn`` package imports it.
"""

from .app import build_parser, main

__all__ = ["main", "build_parser"]
