# mode: both
# needs: bwrap
import os

for path in ("__SECRET_PATH__", "/root/.bash_history", "/etc/shadow"):
    try:
        print(open(path).read())
    except OSError as e:
        print("blocked", e)
print(os.listdir("/"))


def solve(n):
    return -1
