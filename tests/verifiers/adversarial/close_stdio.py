# mode: both
import os

for fd in range(0, 64):
    try:
        os.close(fd)
    except OSError:
        pass
