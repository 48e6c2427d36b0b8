# mode: both
import os

os.execv("/bin/sh", ["/bin/sh", "-c", "echo 4; echo 9; exit 0"])
