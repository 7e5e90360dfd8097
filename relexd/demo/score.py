"""The demo's evaluation command: ``python -m relexd.demo.score PATH`` prints one JSON line.

A module of its own (not ``python -m relexd.demo.evaluate``) because ``relexd.demo`` imports
:mod:`relexd.demo.evaluate`, and running an already imported module as ``__main__`` makes Python
warn that it may behave unpredictably.
"""

from __future__ import annotations

from pathlib import Path

import torch

from relexd.demo.evaluate import score_checkpoint


def main(argv: list[str] | None = None) -> None:
    """``python -m relexd.demo.score PATH``: the demo's evaluation command for ``relexd watch
    --eval`` — the same role lm-eval or a vLLM script plays for a real model. Prints the hook's
    JSON line: ``score`` is the expected reward, ``greedy_accuracy`` rides along."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m relexd.demo.score", description=main.__doc__)
    parser.add_argument("path", type=Path, help="checkpoint or preview directory (config + safetensors)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # beside the trainer and the daemon on a small host
    score = score_checkpoint(args.path)
    print(json.dumps({"score": score.expected_reward, "greedy_accuracy": score.greedy_accuracy}))


if __name__ == "__main__":
    main()
