# mode: both
import sys

sys.setrecursionlimit(10**8)


def solve(n):
    return solve(n + 1)


solve(0)
