"""The child program every peer supervisor runs: announce itself at once, then sleep.

Its first act is one datagram to the benchmark's beacon socket (the path in
argv[1]); the benchmark reads the sender's pid from the kernel's
SCM_CREDENTIALS, translated into its own pid namespace, so this works as a
systemd unit in a namespace too. Run as ``python -I -S _child.py BEACON``:
nothing is imported beyond what the interpreter needs.
"""

import os
import signal
import socket
import sys


def main() -> None:
    """Say "started", then wait for a signal for ever."""
    beacon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    beacon.sendto(b"%d" % os.getpid(), sys.argv[1])
    beacon.close()
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
