"""The LM tokenizer: special-token strings in documents are text; a chat prompt's own markers are special tokens."""

from __future__ import annotations

import pytest

from conftest import wiki_docs
from retrolm.text.tokenizer import EOS_TOKEN, LMTokenizer, train_bpe


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    bpe = train_bpe([d["text"] for d in wiki_docs(30)], 400)
    bpe.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return LMTokenizer(bpe.tok, "bpe-chat")


def test_special_token_strings_in_a_document_are_its_characters(tok):
    text = f"GPT-2 separates documents with {EOS_TOKEN}; chat turns end in <|im_end|>."
    ids = tok.encode(text)
    specials = {tok.eos_id, tok.tok.token_to_id("<|im_end|>")}
    assert not specials & set(ids)  # parsed as special tokens they ended the document in training
    assert tok.decode(ids) == text  # ... and vanished from decoded chunk text (decode skips special tokens)
    assert tok.token_bytes(ids) == text.encode()  # ... and from the bytes bits-per-byte divides by
    assert [list(x) for x in tok.encode_batch([text, "x"])] == [ids, tok.encode("x")]


def test_a_chat_prompt_parses_its_markers_but_not_the_passages(tok):
    passage = "a passage quoting <|im_end|> and <|im_start|>system"
    prompt = f"<|im_start|>user\n{passage}<|im_end|>\n<|im_start|>assistant\n"
    start, end = tok.tok.token_to_id("<|im_start|>"), tok.tok.token_to_id("<|im_end|>")
    ids = tok.encode_prompt(prompt, [passage])
    assert (ids.count(start), ids.count(end)) == (2, 1)  # the template's two turns and one end, not the quoted ones
    assert tok.tok.decode(ids, skip_special_tokens=False) == prompt
    whole = tok.encode_prompt(prompt)  # nothing named as text: every marker string is a special token
    assert (whole.count(start), whole.count(end)) == (3, 2)
    # the piecewise encoding equals the tokenizer's own where nothing named is in the prompt
    assert tok.encode_prompt(prompt, ["<|im_end|> elsewhere"]) == whole
    assert tok.encode_prompt("plain text", [passage]) == tok.encode("plain text")
    # the template's own tokens are the tokenizer's (only the quoted markers become characters)
    assert ids[:3] == whole[:3] and ids[-5:] == whole[-5:]
    # a template that trims its messages: the message is found stripped, its marker is still text
    trimmed = f"<|im_start|>user\n{passage}<|im_end|>\n"
    assert tok.encode_prompt(trimmed, ["  " + passage + "\n"]).count(end) == 1
    # a question quoting a marker after an example turn with the same words: found in its own turn, not the example's
    shot, question = "Question: What is x?", "Question: What is x?<|im_end|>"
    two = f"<|im_start|>user\n{shot}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
    ids = tok.encode_prompt(two, [shot, question])
    assert ids.count(end) == 2 and tok.tok.decode(ids, skip_special_tokens=False) == two
    assert ids[len(tok.encode_prompt(f"<|im_start|>user\n{shot}")) : ][0] == end  # the example's end stays special


def test_spans_of_one_stream_keep_split_characters_whole(tok):
    text = "日本語のテキスト 🙂 é ok"
    ids = tok.encode(text)
    for spans in ([ids[:4], ids[4:]], [[i] for i in ids], [ids[:1], ids[1:7], ids[7:]]):
        parts = tok.decode_spans(spans)
        assert "".join(parts) == text and "\ufffd" not in "".join(parts)  # decoding each span alone gave U+FFFDs
    assert tok.decode_spans([ids[:4], ids[4:]])[0] == "日本"  # the character cut at token 4 goes to the first span


def test_spans_of_a_metaspace_tokenizer_keep_their_spaces():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["▁The", "▁history", "▁of", "▁France", "[UNK]"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    meta = LMTokenizer(raw, "metaspace")
    ids = meta.encode("The history of France")
    assert meta.decode_spans([ids[:2], ids[2:]]) == ["The history", " of France"]  # alone: "of France"



def test_a_pickled_tokenizer_still_reads_special_token_strings_as_text(tok):
    """A worker process gets the tokenizer pickled; the flag that keeps "<|endoftext|>" in a document literal is not
    part of the tokenizer's JSON and must survive the copy."""
    import pickle

    text = f"before {EOS_TOKEN} and <|im_end|> after"
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(text) == tok.encode(text)
    assert copy.eos_id not in copy.encode(text)


def test_a_cut_slice_of_tokens_leaves_out_the_characters_it_splits(tok):
    """A passage cut to a number of tokens, or a window of a document, keeps whole characters: where a cut splits a
    character's bytes (emoji and CJK take several byte-level tokens) it is left out, not shown as U+FFFD."""
    text = "東京 🎉🎉 em dash — and café"
    ids = tok.encode(text)
    assert tok.decode_cut(ids) == tok.decode(ids) == text
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            cut = tok.decode_cut(ids[i:j])
            assert "\ufffd" not in cut and cut in text, (i, j, cut)
    split = [i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i])]
    assert split  # the fixture does split characters
    for i in split:  # what is kept is everything whole: the cut loses less than one character at each end
        head, rest = tok.decode_cut(ids[:i]), tok.decode_cut(ids[i:])
        assert text.startswith(head) and text.endswith(rest) and len(head) + len(rest) == len(text) - 1


def test_generation_stops_at_the_end_of_a_chat_turn(tok):
    """SmolLM2-Instruct documents end in <|endoftext|> (eos_id) but its answers in <|im_end|>: generation that stopped
    only at eos_id went on past the answer and wrote chat turns of its own (decode hid the markers)."""
    import torch

    from retrolm.infer.incontext import _decode

    im_end, im_start = tok.tok.token_to_id("<|im_end|>"), tok.tok.token_to_id("<|im_start|>")
    assert tok.stop_ids == {tok.eos_id, im_end}  # <|im_start|> opens a turn: not a stop
    plain = train_bpe([d["text"] for d in wiki_docs(5)], 300)
    assert plain.stop_ids == {plain.eos_id}

    class Scripted:
        """Writes 7, 8, then <|im_end|>, then a new turn."""

        def step(self, ids, cache=None):
            n = 0 if cache is None else cache + 1
            script = [7, 8, im_end, im_start, 9]
            logits = torch.zeros(tok.vocab_size)
            logits[script[min(n, len(script) - 1)]] = 10.0
            return logits, n

    gen = torch.Generator().manual_seed(0)
    assert _decode(Scripted(), [1, 2], 10, 0.0, 1.0, gen, tok.stop_ids) == ([7, 8], True)
    assert _decode(Scripted(), [1, 2], 5, 0.0, 1.0, gen, frozenset()) == ([7, 8, im_end, im_start, 9], False)
