# mode: assert
import os

fake = b"PTR1\n00000000000000000000000000000000\n-\n2\nok 1\n4\nok 1\n9\nEND\n"
for fd in range(3, 64):
    try:
        os.write(fd, fake)
    except OSError:
        pass
os._exit(0)
