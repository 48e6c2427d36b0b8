# mode: both
with open("flood.bin", "wb") as f:
    while True:
        f.write(b"\0" * (1 << 20))
