"""The o200k_harmony encoding against OpenAI's o200k_base (openai-harmony's Rust tokenizer over the
real ranks of bpe-openai), its offline sources, and the tokenizer.json we write."""

from __future__ import annotations

import json
import random

import pytest
import tiktoken

from gptoss_cli import tokenizer as tk
from gptoss_cli.errors import GptossError
from gptoss_cli.tokenizer import SPECIAL_TOKENS, load_encoding, write_tokenizer_json


def _random_texts(n: int, seed: int = 0) -> list[str]:
    pool = (
        "aaaab   \t\n\r=-_!.,:;()[]{}<>'\"/\\0123456789éàüßøñ你好世界日本語한국어абвгдاب"
        "تकखΩ∑∫√🎉👍🏽👩\u200d👩\u200d👧🇫🇷e\u0301\u200b\u00a0\u3000"
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


CORPUS = [
    "Hello, world! I'm here; you're there. THEY'LL see, we'D know, it'S fine.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\r\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++\n",
    "1234567890 3.14159 -0.5e-10 1,000,000 0x1F 2024-06-01 12:30:45 +33 6 12 34 56 78",
    "   leading and trailing   ", "\n\n\n", " \t \n ", "a  b   c    d", "\r\n\r\n", " " * 40,
    "é ü ß ø ñ Ångström café naïve façade", "你好，世界！这是一个测试。", "日本語のテキストです。",
    "مرحبا بالعالم", "नमस्ते दुनिया", "안녕하세요 세계", "Привет, мир!", "Γειά σου Κόσμε",
    "🎉👍🏽 family 👩\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 e\u0301 zero\u200bwidth ∑∫√∞ ＦＵＬＬ",
    "https://example.com/path?query=1&x=%20#frag", '{"key": [1, 2.5, null, true], "s": "v"}',
    "<div class=\"x\">Hi &amp; bye</div>", "# Title\n\n- item *bold* `code`\n> quote",
    "a" * 100, "=" * 70, "-" * 33, "!" * 17, "ab" * 50, "\t" * 9, "0" * 25,
    "<|endoftext|> and <|start|> as plain text", "",
] + _random_texts(300)


def test_specials_have_their_ids(o200k_encoding):
    enc = o200k_encoding
    assert enc.name == "o200k_harmony" and enc.n_vocab == 201088
    named = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
             "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
             "<|message|>": 200008, "<|call|>": 200012, "<|endofprompt|>": 200018}
    assert all(SPECIAL_TOKENS[name] == i for name, i in named.items())
    # every id from 199998 on is special, once: the named ones and <|reserved_N|> for the rest
    assert sorted(SPECIAL_TOKENS.values()) == list(range(199998, 201088))
    for name, i in SPECIAL_TOKENS.items():
        if name not in named:
            assert name == f"<|reserved_{i}|>"
        assert enc.encode(name, allowed_special="all") == [i]
        assert enc.decode([i]) == name
    assert enc.special_tokens_set == set(SPECIAL_TOKENS) | {"<|reserved_200018|>"}


def test_both_names_of_200018(o200k_encoding, harmony_oracle):
    """tiktoken's o200k_harmony names 200018 <|endofprompt|> (from o200k_base) and
    <|reserved_200018|>; openai-harmony knows only the latter. Either encodes to 200018."""
    for name in ("<|endofprompt|>", "<|reserved_200018|>"):
        assert o200k_encoding.encode(name, allowed_special="all") == [200018]
        assert o200k_encoding.encode(f"a{name}b", allowed_special="all")[1] == 200018
    assert harmony_oracle.encode("<|reserved_200018|>", allowed_special="all") == [200018]
    assert o200k_encoding.decode([200018]) == "<|endofprompt|>"


def test_specials_equal_tiktoken_o200k_harmony(o200k_dir, o200k_encoding, monkeypatch):
    """tiktoken's own o200k_harmony definition, its ranks read from the local file (offline)."""
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    local = str(o200k_dir / "o200k_base.tiktoken")
    load = openai_public.load_tiktoken_bpe
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda _url, **kw: load(local, **kw))
    spec = openai_public.o200k_harmony()
    assert o200k_encoding._special_tokens == spec["special_tokens"]
    theirs = tiktoken.Encoding("theirs", pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                               special_tokens=spec["special_tokens"])
    assert theirs.decode([200018]) == o200k_encoding.decode([200018])


def test_specials_agree_with_openai_harmony(o200k_encoding, harmony_oracle):
    for name, i in SPECIAL_TOKENS.items():
        assert harmony_oracle.is_special_token(i)
        # tiktoken's o200k_harmony names 200018 both <|endofprompt|> and <|reserved_200018|>;
        # openai-harmony decodes it as the latter, we keep o200k_base's name (DESIGN.md 4)
        if i != 200018:
            assert harmony_oracle.decode([i]) == name
    assert not harmony_oracle.is_special_token(199997)


def test_encoding_equals_o200k_base(o200k_encoding, harmony_oracle):
    for text in CORPUS:
        ours = o200k_encoding.encode_ordinary(text)
        assert ours == harmony_oracle.encode(text, disallowed_special=()), repr(text)
        assert o200k_encoding.decode(ours) == text


def test_rendered_harmony_text_encodes_like_the_oracle(o200k_encoding, harmony_oracle):
    text = "<|start|>user<|message|>Hi there 👋<|end|><|start|>assistant<|channel|>final<|message|>"
    ours = o200k_encoding.encode(text, allowed_special="all")
    assert ours == harmony_oracle.encode(text, allowed_special="all")
    with pytest.raises(ValueError):  # tiktoken's guard: specials in text must be allowed explicitly
        o200k_encoding.encode(text)


# ---- sources -----------------------------------------------------------------------------------


def _same_ranks(a, b) -> bool:
    return all(a.decode_single_token_bytes(i) == b.decode_single_token_bytes(i) for i in range(199998))


def test_source_order(tmp_path, monkeypatch, o200k_dir):
    ranks_file = o200k_dir / "o200k_base.tiktoken"
    model = tmp_path / "model"
    (model / "original").mkdir(parents=True)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    assert tk.find_ranks_source(model).name == "o200k_base.tiktoken.gz"  # bpe-openai's, last
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_dir))
    assert tk.find_ranks_source(model) == ranks_file
    (model / "o200k_base.tiktoken").write_bytes(ranks_file.read_bytes())
    assert tk.find_ranks_source(model) == model / "o200k_base.tiktoken"
    # an original/ folder also looks in its parent
    assert tk.find_ranks_source(model / "original") == model / "o200k_base.tiktoken"
    (model / "tokenizer.json").write_text("{}")
    assert tk.find_ranks_source(model) == model / "tokenizer.json"
    assert tk.find_ranks_source(None) == ranks_file


def test_load_from_each_kind_of_source(tmp_path, monkeypatch, o200k_dir, o200k_encoding):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    packaged = load_encoding(tmp_path)  # an empty folder: bpe-openai's gzipped ranks
    assert _same_ranks(packaged, o200k_encoding)
    assert load_encoding(tmp_path) is packaged  # built once per source
    original = tmp_path / "m" / "original"
    original.mkdir(parents=True)
    ranks = (o200k_dir / "o200k_base.tiktoken").read_bytes()
    (original.parent / "o200k_base.tiktoken").write_bytes(ranks)
    from_parent = load_encoding(original)
    assert from_parent.encode_ordinary("hello world") == [24912, 2375]


def test_no_source_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    monkeypatch.setattr(tk, "_packaged_tiktoken", lambda: None)
    with pytest.raises(GptossError) as err:
        load_encoding(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    needed = (str(tmp_path), "tokenizer.json", "o200k_base.tiktoken", "TIKTOKEN_ENCODINGS_BASE",
              "bpe-openai")
    assert all(n in message for n in needed), message


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}),
    json.dumps({"model": {"type": "BPE", "vocab": {"☃x": 0}}}),          # not the byte alphabet
    json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}),    # bytes missing
    json.dumps({"model": {"type": "BPE", "vocab": {"a": "zero"}}}),       # ids not numbers
    json.dumps({"added_tokens": []}),
])
def test_bad_tokenizer_json_is_a_gptoss_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(GptossError, match="tokenizer.json|ranks"):
        load_encoding(tmp_path)


def test_bad_tiktoken_file_is_a_gptoss_error(tmp_path):
    (tmp_path / "o200k_base.tiktoken").write_text("not base64!! x\n")
    with pytest.raises(GptossError, match="o200k_base.tiktoken"):
        load_encoding(tmp_path)


# ---- the tokenizer.json we write -------------------------------------------------------------


@pytest.fixture(scope="module")
def written_tokenizer_json(tmp_path_factory, o200k_dir):
    folder = tmp_path_factory.mktemp("tokenizer-json")
    write_tokenizer_json(folder / "tokenizer.json", o200k_dir / "o200k_base.tiktoken")
    return folder


def test_tokenizers_library_reads_our_tokenizer_json(written_tokenizer_json, o200k_encoding):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(written_tokenizer_json / "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == 201088
    for text in CORPUS:
        if "<|" in text:
            continue  # the HF tokenizer treats added tokens as specials everywhere
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == o200k_encoding.encode_ordinary(text), repr(text)
        assert hf.decode(ids, skip_special_tokens=False) == text
    prompt = "<|start|>user<|message|>héllo<|end|><|start|>assistant"
    ids = hf.encode(prompt, add_special_tokens=False).ids
    assert ids == o200k_encoding.encode(prompt, allowed_special="all")


def test_load_encoding_reads_our_tokenizer_json(written_tokenizer_json, o200k_encoding):
    enc = load_encoding(written_tokenizer_json)
    assert tk.find_ranks_source(written_tokenizer_json).name == "tokenizer.json"
    assert _same_ranks(enc, o200k_encoding)
    assert enc.special_tokens_set == o200k_encoding.special_tokens_set
    for text in CORPUS[:40]:
        assert enc.encode_ordinary(text) == o200k_encoding.encode_ordinary(text)


def test_load_encoding_reads_a_hub_style_tokenizer_json(written_tokenizer_json, tmp_path, o200k_encoding):
    """The hub's gpt-oss tokenizer.json lists only ids 199998..200018 as added tokens; some exports
    also put the special names in the vocab. Specials come from SPECIAL_TOKENS either way."""
    document = json.loads((written_tokenizer_json / "tokenizer.json").read_text(encoding="utf-8"))
    document["added_tokens"] = [t for t in document["added_tokens"] if t["id"] <= 200018]
    document["model"]["vocab"].update({t["content"]: t["id"] for t in document["added_tokens"]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    enc = load_encoding(tmp_path)
    assert enc.special_tokens_set == o200k_encoding.special_tokens_set
    assert enc.encode("<|start|>hi there", allowed_special="all") == [200006, 3686, 1354]
    assert _same_ranks(enc, o200k_encoding)


def test_merges_follow_tiktoken_rank_order(written_tokenizer_json, o200k_dir):
    ranks = tk.read_ranks(o200k_dir / "o200k_base.tiktoken")
    model = json.loads((written_tokenizer_json / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = model["merges"]
    # one merge per multi-byte token, in rank order: the first merges build the first tokens
    assert len(merges) == sum(len(t) > 1 for t in ranks)
    merged_ranks = [model["vocab"]["".join(m.split(" "))] for m in merges]
    assert merged_ranks == sorted(merged_ranks)
