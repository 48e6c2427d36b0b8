"""Advantages, losses, KL estimators, reduction; the Ray learner; the training controllers."""
