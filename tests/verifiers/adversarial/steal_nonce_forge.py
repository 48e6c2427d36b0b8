# mode: assert
# Reads the runner's nonce pipe (brute-forcing fds), forges a complete "all ok" record, and exits before the tests.
# The expected values of `assert f(x) == LITERAL` never enter the sandbox, so the forged values cannot match them.
import os
import re

nonce = None
fds = []
for fd in range(3, 256):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 256)
    except OSError:
        continue
    if re.fullmatch(rb"[0-9a-f]{32}", data):
        nonce = data.decode()
if nonce:
    fake = f"PTR1\n{nonce}\n-\n2\nok 1\n0\nok 1\n0\nEND\n".encode()
    for fd in fds:
        try:
            os.write(fd, fake)
        except OSError:
            pass
os._exit(0)
