# mode: assert
# needs: bwrap
import os
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["/bin/sh", "-c", "sleep 30; echo __MARKER__"])
    os._exit(0)
time.sleep(0.2)


def solve(n):
    return n * n + 1
