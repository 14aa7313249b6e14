"""`make run`'s launcher: run a command so that Ctrl-C stops it, and make, cleanly.

A terminal's Ctrl-C signals its whole foreground process group, make included, and GNU make answers
a SIGINT of its own with "make: *** [run] Interrupt" and exit 130 however cleanly the service
stopped. So the command runs in a process group of its own that owns the terminal: Ctrl-C reaches
the service alone, it drains and exits 0, and so does make. Without a terminal it just runs.

    python deploy/foreground.py COMMAND [ARG...]
"""
import os
import signal
import subprocess
import sys


def main(command):
    try:
        tty = os.open('/dev/tty', os.O_RDWR)
        in_front = os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        in_front = False  # no controlling terminal: nothing to hand over
    if not in_front:
        os.execvp(command[0], command)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may then hand the terminal back
    child = subprocess.Popen(command, process_group=0)
    os.tcsetpgrp(tty, child.pid)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # e.g. make passes SIGTERM on
        signal.signal(signum, lambda signum, _: child.send_signal(signum))
    code = child.wait()  # negative: the signal that ended it
    try:
        os.tcsetpgrp(tty, os.getpgrp())
    except OSError:
        pass  # the terminal went away (make was killed first): there is nothing to hand back
    return code if code >= 0 else 128 - code


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
