# mode: both
# needs: bwrap
import os

print(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(pid, open(f"/proc/{pid}/environ", "rb").read())
        except OSError:
            pass


def solve(n):
    return os.environ.get("SECRET", -1)
