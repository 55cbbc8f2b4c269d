"""minitpo: Thought Preference Optimization (Wu et al., 2024) for small instruct models, in plain PyTorch."""

__version__ = "0.1.0"
