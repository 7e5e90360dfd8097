"""relexd: online RELEX extrapolation of RL training checkpoints.

The weights of an LLM under RL with verifiable rewards move along an almost rank-1, almost linear
path; relexd learns that path while training runs and writes preview checkpoints ahead of it.
"""

__version__ = "0.1.0"
