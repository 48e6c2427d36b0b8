# mode: both
while True:
    pass
