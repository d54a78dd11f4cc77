"""Load: many clients at once against the launched app on the embedded model (issue 17). Slow: run with -m slow.

16 clients x 5 requests at once: every request finishes or is refused with "queue full", the server keeps serving,
and each image equals, bit for bit, the one its prompt and seed give when run alone. Then 200 requests in all: the
server's resident memory after 200 stays within 10 % of what it was after 20 (no per-request leak).
"""
import threading
import time

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from tests.conftest import running_app

pytestmark = pytest.mark.slow

CLIENTS, EACH = 16, 5
PROMPTS = ["a red circle on a blue background", "a small green square on the left", "a yellow star",
           "a blue triangle on a white background"]
ARGS = dict(steps=3, width=64, height=64, sampler="Euler a")


def _rss() -> int:
    with open("/proc/self/status") as f:  # the app serves from this process (prevent_thread_lock)
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _pixels(gallery) -> np.ndarray:
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


def _job(k: int) -> dict:
    return dict(prompt=PROMPTS[k % len(PROMPTS)], seed=1000 + k, **ARGS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(["--model", "embedded", "--outputs", str(tmp_path_factory.mktemp("out"))]) as (url, engine):
        yield url


def test_sixteen_clients_at_once_get_their_own_images(served):
    results, errors = {}, []

    def client_loop(c: int) -> None:
        client = Client(served, verbose=False)
        for i in range(EACH):
            k = c * EACH + i
            try:
                results[k] = _pixels(client.predict(**_job(k), api_name="/generate")[0])
            except Exception as exc:  # only a full queue may refuse a request
                errors.append(str(exc))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    print(f"load: {len(results)} served, {len(errors)} refused (queue full) in {time.time() - start:.0f} s")
    assert all("queue" in e.lower() for e in errors), errors[:3]
    assert len(results) + len(errors) == CLIENTS * EACH and len(results) >= CLIENTS * EACH // 2
    alone = Client(served, verbose=False)
    for k in sorted(results)[::7]:  # a spread of them, each run again with nobody else around
        assert np.array_equal(results[k], _pixels(alone.predict(**_job(k), api_name="/generate")[0])), k


def test_memory_is_flat_over_two_hundred_requests(served):
    client = Client(served, verbose=False)
    for k in range(200):
        client.predict(**_job(k), api_name="/generate")
        if k == 19:
            after_20 = _rss()
    after_200 = _rss()
    print(f"rss: {after_20 >> 20} MB after 20 requests, {after_200 >> 20} MB after 200")
    assert after_200 <= 1.10 * after_20, f"RSS grew from {after_20 >> 20} MB to {after_200 >> 20} MB"
