"""An engine that keeps the Engine protocol (runtime/requests.py) but fails on purpose, for the API
failure tests."""

from __future__ import annotations

import threading
import time

from runtime.requests import EngineFailed, FinishEvent, RequestHandle, TokenEvent


class FakeTokenizer:
    has_chat_template = True
    bos_token_id = None
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        return [1] * (2 + len(messages))

    def encode(self, text, **kw):
        return [1] * max(1, len(text.split()))

    def decode(self, ids):
        return "x" * len(ids)

    def convert_ids_to_tokens(self, i):
        return "x"

    def get_added_vocab(self):
        return {}


class FakeEngine:
    """Emits `tokens_before_failure` tokens, then either pushes an error FinishEvent
    (`push_error`) or just sets `failed` and goes silent (a rank that died mid-collective)."""

    model_id = "fake"
    context_length = 100
    created = 1

    def __init__(self, tokens_before_failure=2, push_error=True, ready=True):
        self.tokenizer = FakeTokenizer()
        self.model_path = "/models/fake"
        self.ready = ready
        self.failed = None
        self.n = tokens_before_failure
        self.push_error = push_error

    def load(self):
        return 0, 0

    def arriving(self):
        pass

    def submit(self, req, loop=None):
        if self.failed:
            raise EngineFailed(self.failed)
        h = RequestHandle(req, loop)

        def run():
            for i in range(self.n):
                time.sleep(0.05)
                h.push(TokenEvent(1, f"t{i} "))
            time.sleep(0.05)
            self.failed = "rank 1 stopped: its process ended"
            if self.push_error:
                h.push(FinishEvent("error", 3, self.n, error=self.failed))

        threading.Thread(target=run, daemon=True).start()
        return h
