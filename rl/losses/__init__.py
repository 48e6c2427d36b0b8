"""Per-token losses: pure functions of tensors returning `(loss, metrics)` with detached metrics."""

from posttrain.rl.losses.policy import clipped_policy_loss

__all__ = ["clipped_policy_loss"]
