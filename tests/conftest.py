"""Fixtures shared by test modules."""

from contextlib import contextmanager

import pytest
import torch


class FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class FakeStream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA streams and events faked on the host: a copy "on a stream" happens when it is issued (tiermem.gpu_tier's
    schedule, tested without a GPU)."""
    @contextmanager
    def stream(s):
        yield

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", stream)
