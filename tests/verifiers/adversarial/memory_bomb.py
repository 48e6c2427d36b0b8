# mode: both
hog = []
while True:
    hog.append(bytearray(50 << 20))
