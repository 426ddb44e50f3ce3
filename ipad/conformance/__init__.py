"""The conformance kit: drives a third-party worker executable or client through the protocol.

Runs as a process of its own (``python -m ipad.conformance``), on the standard
library, ``ipad.protocol`` and blocking sockets only; docs/conformance.md lists its rules.
"""
