"""CaseOps transform: SPEC 3.2 examples, round trip, invariants, decoder errors, byte counts."""
import pytest
from hypothesis import given, settings, strategies as st

import lossless_caps as lc
from lossless_caps import ALLCAPS, CAPNEXT, ESC, TITLE

T, A, C, E = TITLE, ALLCAPS, CAPNEXT, ESC


def test_operator_constants():
    assert lc.OPERATORS == ("\ue001", "\ue002", "\ue003", "\ue004")
    assert lc.TRANSFORM_NAME == "lossless_caps_caseops_v1"


@pytest.mark.parametrize("text, expected", [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
    ("iPhone", f"i{C}phone"),
    ("OpenAI", f"{T}open{C}a{C}i"),
    ("McDonald", f"{T}mc{C}donald"),
    ("ABc", f"{T}a{C}bc"),
    ("DON'T", f"{A}don'{T}t"),
    ("U.S.A.", f"{T}u.{T}s.{T}a."),
    ("I", f"{T}i"),
    ("A b", f"{T}a b"),
    ("abc1Def", f"abc1{T}def"),
    ("CAFÉ", f"{A}cafÉ"),              # only ASCII letters are transformed
    ("Ｈello ÉCOLE", f"Ｈello É{A}cole"),  # full-width and accented letters are not ASCII
    (E, E + E),
    (T + "x", E + T + "x"),
    ("\ue000Ab", f"\ue000{T}ab"),         # U+E000 is not special
    ("already lower 123", "already lower 123"),
    ("", ""),
])
def test_spec_examples(text, expected):
    assert lc.encode(text) == expected
    assert lc.decode(expected) == text


def test_round_trip_docs(docs):
    assert docs, "the docs fixture is empty"
    changed = 0
    for doc in docs:
        enc = lc.encode(doc)
        assert lc.decode(enc) == doc
        changed += enc != doc
    assert changed > len(docs) // 2  # real text has capitals, so the transform did something


ALPHABET = st.sampled_from(list("aZbYzA'.- 0129\n\t") + list(lc.OPERATORS)
                           + ["\ue000", "é", "É", "ß", "Ω", "ﬁ", "Ａ", "😀", "\u0301", "\x00"])
TEXTS = st.lists(ALPHABET, max_size=40).map("".join) | st.text(max_size=30)


def assert_invariants(encoded: str):
    """No uppercase ASCII; an unescaped operator is followed by an ASCII lowercase letter
    (or CAPNEXT/ESC rules), TITLE/ALLCAPS only at word starts."""
    assert not any("A" <= ch <= "Z" for ch in encoded)
    i, prev_letter = 0, False
    while i < len(encoded):
        ch = encoded[i]
        if ch == ESC:
            assert encoded[i + 1] in lc.OPERATORS  # the encoder escapes only operators
            i, prev_letter = i + 2, False
            continue
        if ch in (TITLE, ALLCAPS, CAPNEXT):
            nxt = encoded[i + 1]
            assert nxt.isascii() and nxt.islower(), repr(encoded)
            if ch != CAPNEXT:
                assert not prev_letter, f"word operator inside a word: {encoded!r}"
            else:
                assert prev_letter, f"CAPNEXT at a word start: {encoded!r}"
            i += 1
            continue
        prev_letter = ch.isascii() and ch.isalpha()
        i += 1


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_round_trip_and_invariants_random(text):
    enc = lc.encode(text)
    assert lc.decode(enc) == text
    assert_invariants(enc)
    assert lc.piece_byte_counts([enc]) == [len(text.encode("utf-8"))]


@pytest.mark.parametrize("bad", [
    E,                      # dangling escape
    T,                      # dangling word operator
    "a" + C,                # dangling CAPNEXT
    T + "1",                # operator before a non-letter
    C + " ",
    "a" + T + "b",          # TITLE inside a word
    A + T + "a",            # two word operators
    C + C + "a",            # repeated CAPNEXT
    C + T + "a",            # word operator after CAPNEXT
    T + E + T + "a",        # operator before an escaped non-letter
    "ab" + E + "c" + T + "d",  # escaped letter keeps the word open
])
def test_decoder_errors(bad):
    with pytest.raises(ValueError):
        lc.decode(bad)
    with pytest.raises(ValueError):
        lc.piece_byte_counts([bad[:1], bad[1:]])


def test_decoder_accepts_escaped_letters_and_capnext_at_word_start():
    # Not produced by the encoder but well-defined by the state machine of SPEC 3.3.
    assert lc.decode(E + "x") == "x"
    assert lc.decode(C + "ab") == "Ab"
    assert lc.decode(A + "ab" + C + "c") == "ABC"
    assert lc.decode(A + "ab" + E + "x" + "y z") == "ABxY z"  # ALLCAPS lasts to the end of the word


def independent_piece_counts(surfaces):
    """Per piece: UTF-8 bytes of its chars, with unescaped operators counting 0 (no decoder)."""
    counts, escaped = [], False
    for surface in surfaces:
        n = 0
        for ch in surface:
            if ch in lc.OPERATORS and not escaped:
                escaped = ch == ESC
                continue
            escaped = False
            n += len(ch.encode("utf-8"))
        counts.append(n)
    return counts


def test_piece_byte_counts_examples():
    # markers and ESC count 0; the escaped TITLE counts 3 on its own piece; empty surfaces 0
    surfaces = ["a ", T + "the", " ", A + "nasa", " ", E, T, "", "é"]
    assert lc.piece_byte_counts(surfaces) == [2, 3, 1, 4, 1, 0, 3, 0, 2]
    assert lc.piece_byte_counts(["i", C, "phone"]) == [1, 0, 5]
    assert lc.piece_byte_counts([E, E]) == [0, 3]
    assert lc.piece_byte_counts([]) == []


@settings(max_examples=300, deadline=None)
@given(TEXTS, st.lists(st.integers(0, 60), max_size=8))
def test_piece_byte_counts_random_splits(text, cuts):
    enc = lc.encode(text)
    cuts = sorted({min(c, len(enc)) for c in cuts})
    surfaces = [enc[a:b] for a, b in zip([0] + cuts, cuts + [len(enc)])]
    counts = lc.piece_byte_counts(surfaces)
    assert counts == independent_piece_counts(surfaces)
    assert sum(counts) == len(text.encode("utf-8"))


def test_piece_byte_counts_raises_on_dangling_state():
    with pytest.raises(ValueError):
        lc.piece_byte_counts(["a", T])
    with pytest.raises(ValueError):
        lc.piece_byte_counts([E])


def test_casefold():
    assert lc.casefold("The ＮＡＳＡ ﬁle Straße") == "the nasa file straße"
    assert lc.casefold("") == ""
