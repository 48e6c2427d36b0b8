# mode: both
# needs: bwrap
import socket

try:
    socket.create_connection(("127.0.0.1", int("__PORT__")), timeout=1).sendall(b"leak")
    print("connected")
except OSError as e:
    print("blocked", e)


def solve(n):
    return 0
