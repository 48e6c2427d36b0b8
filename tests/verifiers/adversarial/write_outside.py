# mode: both
# needs: bwrap
for path in ("__PWNED__", "/work/main/PWNED", "__PWNED__.2"):
    try:
        with open(path, "w") as f:
            f.write("pwned")
    except OSError as e:
        print("blocked", path, e)


def solve(n):
    return n + 1
