"""posttrain: reinforcement-learning post-training for language models.

Ray rollout workers generate, learners train (GRPO and friends), rewards come from verifiers,
reward models and user functions. See README.md and the design notes.
"""

__version__ = "0.1.0"
