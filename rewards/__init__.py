"""The reward-function interface, loading user functions, weighted combination, built-in rewards."""
