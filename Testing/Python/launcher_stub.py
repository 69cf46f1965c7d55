"""A stand-in for Slicer's ``PythonSlicer`` launcher (CTKAppLauncher), for the Cancel tests.

Starts its arguments as a child process (as the launcher starts ``python-real``), prints nothing of
its own, exits with the child's code, and on SIGTERM dies at once *without* passing the signal on —
so a tree stopper that signals only this process would leave the child running.
"""

import os
import signal
import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen(sys.argv[1:])
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(143))
    sys.exit(child.wait())
