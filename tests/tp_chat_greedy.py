"""A rank program: greedy tokens of one chat prompt, rendered by the model's own tokenizer.

    exolaunch exec -n N -- python -m tests.tp_chat_greedy DIR

Like tests/tp_greedy.py (same loader, same `greedy`), but for a real instruct model: every rank
prints {"rank": r, "prompt": [...], "tokens": [...]}; `chat_prompt` is what the test's
single-process reference decodes too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.tp_greedy import greedy

MESSAGES = [{"role": "user", "content": "Name three rivers in Europe and say where each one flows."}]
MAX_TOKENS = 16


def chat_prompt(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))


def main(model_dir: str) -> None:
    from runtime.group import finish, init_group
    from runtime.loader import load

    group = init_group()
    model, tokenizer, _ = load(Path(model_dir), group, "tensor", Path(model_dir).name)
    prompt = chat_prompt(tokenizer)
    tokens = greedy(model, [prompt], MAX_TOKENS)[0]
    print(json.dumps({"rank": group.rank(), "prompt": prompt, "tokens": tokens}), flush=True)
    finish(group)


if __name__ == "__main__":
    main(sys.argv[1])
