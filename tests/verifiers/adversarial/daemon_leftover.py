# mode: both
# needs: bwrap
import subprocess

subprocess.Popen(
    ["/bin/sh", "-c", "sleep 30; echo __MARKER__"],
    start_new_session=True,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)


def solve(n):
    return 0
