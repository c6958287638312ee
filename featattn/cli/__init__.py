"""The ``featattn`` command line (``featattn demo``, ``featattn bench``, ``featattn info``;
also ``python -m featattn``): the parser and commands in :mod:`.app`, the MQAR demo in
:mod:`.demo`, the backend benchmark in :mod:`.bench`, what ``info`` gathers in :mod:`.info`,
and featattn's one terminal UI (progress bars, tables; also used by
:func:`featattn.hf.transfer_attention`) in :mod:`.ui`.  Nothing in the core
``featattn`` package imports it.
"""

from .app import build_parser, main

__all__ = ["main", "build_parser"]
