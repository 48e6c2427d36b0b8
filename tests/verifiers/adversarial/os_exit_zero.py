# mode: assert
import os

os._exit(0)
