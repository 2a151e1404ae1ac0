"""The tokenizer sdlora makes for its tiny and shipped bases: every listed word is one token."""

from __future__ import annotations

from sdlora.models.tiny import DEFAULT_WORDS, make_tokenizer


def test_every_listed_word_is_one_token_even_when_another_words_merges_rank_first():
    # "red" is listed before "green": its r+e merge ranks first and once split "green" into g/re/e/n, as it split
    # "triangle" and "striped" (the shipped base's captions lost words to the 24-token limit).
    tokenizer = make_tokenizer(DEFAULT_WORDS)
    split = {w: tokenizer.tokenize(w) for w in DEFAULT_WORDS if len(tokenizer.tokenize(w)) != 1}
    assert split == {}
    caption = "a yellow sks ring on a green background, striped style"
    assert tokenizer.tokenize(caption) == [w + "</w>" for w in caption.replace(",", " ,").split()]


def test_words_not_listed_still_tokenize_into_pieces():
    tokenizer = make_tokenizer(["red", "green"])
    assert "".join(tokenizer.tokenize("greenish")).replace("</w>", "") == "greenish"
    assert tokenizer.tokenize("reddish")[0] != "reddish</w>"
