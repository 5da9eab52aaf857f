"""Block accounting of the paged KV cache and the runner's input checks: capacity is bounded, rewinds free blocks,
a failed step changes nothing, and release returns every block."""

import pytest
import torch

from hf_tiny import make_checkpoint
from minedraft.runtime.checkpoint import load_model
from minedraft.runtime.kv_cache import CacheFull, PagedKVCache
from minedraft.runtime.runner import Extend, ModelRunner


def cache(num_blocks=4, block_size=4):
    return PagedKVCache(1, 1, 2, num_blocks, block_size, torch.float32, torch.device("cpu"))


def test_grow_rewind_free():
    c = cache()
    assert c.resize("a", 5) and c.used_blocks == 2
    c.resize("a", 9)
    assert c.used_blocks == 3 and c.length("a") == 9
    c.resize("a", 4)  # rewind to a block boundary frees the tail blocks
    assert c.used_blocks == 1 and c.length("a") == 4
    assert c.free("a") and not c.free("a")
    assert c.used_blocks == 0


def test_cache_full_is_atomic():
    c = cache(num_blocks=3)
    c.resize("a", 8)
    assert not c.can_fit({"b": 5}) and c.can_fit({"b": 4}) and c.can_fit({"a": 12})
    with pytest.raises(CacheFull):
        c.resize("b", 5)
    assert "b" not in c.seqs and c.used_blocks == 2
    with pytest.raises(CacheFull):
        c.resize("a", 13)
    assert c.length("a") == 8 and c.used_blocks == 2


def test_blocks_are_not_shared_between_sequences():
    c = cache(num_blocks=8)
    a = list(c.resize("a", 9))
    b = list(c.resize("b", 9))
    assert not set(a) & set(b)
    c.free("a")
    c2 = c.resize("c", 16)
    assert not set(c2) & set(b)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path)
    return ModelRunner(load_model(path), max_cached_tokens=64, block_size=8)


@pytest.mark.parametrize("item, message", [
    (Extend("x", 0, []), "no tokens"),
    (Extend("x", 3, [5]), "outside its cached length"),
    (Extend("x", 0, [5, 97]), "outside vocabulary"),
    (Extend("x", 0, [-1]), "outside vocabulary"),
    (Extend("x", 250, [5] * 10), "outside its cached length"),
])
def test_runner_rejects_bad_input(runner, item, message):
    with pytest.raises(ValueError, match=message):
        runner.step([item])
    assert runner.cache.used_blocks == 0


def test_runner_duplicate_and_context_limit(runner):
    with pytest.raises(ValueError, match="twice"):
        runner.step([Extend("x", 0, [5]), Extend("x", 0, [6])])
    big = ModelRunner(runner.model, max_cached_tokens=1024, block_size=8)
    with pytest.raises(ValueError, match="exceeds the model context"):
        big.step([Extend("x", 0, [5] * 257)])


def test_runner_cache_full_changes_nothing(runner):
    runner.step([Extend("a", 0, [5] * 40)])
    used = runner.cache.used_blocks
    with pytest.raises(CacheFull):
        runner.step([Extend("a", 40, [6]), Extend("b", 0, [7] * 30)])
    assert runner.cache.used_blocks == used and runner.length("a") == 40 and runner.length("b") == 0
    assert runner.release_all() == 1 and runner.cache.used_blocks == 0
