"""CaseOps text transform `lossless_caps_caseops_v1` (PR #1729's lossless case operators).

The encoder lowercases ASCII letters and records case with four private-use
operator characters; the decoder restores the text exactly.  Only ASCII
letters A-Z/a-z are case-transformed; everything else is copied verbatim.

    encode("The NASA Launch") == TITLE + "the " + ALLCAPS + "nasa " + TITLE + "launch"

`piece_byte_counts` gives, for the SentencePiece piece surfaces of a
transformed text, how many bytes of the ORIGINAL text each piece stands for
(the validation byte sidecar, i.e. the BPB denominator).  It runs the same
state machine as `decode`.
"""
import re
import unicodedata

TRANSFORM_NAME = "lossless_caps_caseops_v1"
TITLE = "\ue001"    # next word: first letter uppercase, rest lowercase
ALLCAPS = "\ue002"  # next word: every letter uppercase (len >= 2)
CAPNEXT = "\ue003"  # next letter uppercase (inside mixed-case words)
ESC = "\ue004"      # next character is a literal operator character
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

# A maximal ASCII-letter run holding at least one uppercase letter (the
# look-behind makes matches start only at run starts, so the scan stays
# linear), or a literal operator character that needs escaping.
_ENCODE_RE = re.compile(r"[\ue001-\ue004]|(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
# Decoder tokens: an escape with its escaped char (or a dangling ESC at the
# end), a single operator, a letter run, or a run of anything else.
_DECODE_RE = re.compile(r"\ue004[\s\S]?|[\ue001-\ue003]|[A-Za-z]+|[^A-Za-z\ue001-\ue004]+")


def _encode_match(m):
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    lw = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + lw
    if w[1:].islower() or len(w) == 1:  # the match holds an uppercase letter, so w[0] is it here
        return TITLE + lw
    out = [TITLE + lw[0] if w[0].isupper() else lw[0]]
    out += [CAPNEXT + lc if c.isupper() else lc for c, lc in zip(w[1:], lw[1:])]
    return "".join(out)


def encode(text: str) -> str:
    """CaseOps-encode `text`."""
    return _ENCODE_RE.sub(_encode_match, text)


def _decode_tokens(text: str):
    """The CaseOps decoder state machine, one regex token at a time.

    Yields (end, out): `out` is the decoded output of the token ending at input
    index `end`; its characters correspond one to one to the LAST len(out)
    input characters of the token (operators and ESC produce nothing).
    Raises ValueError on malformed input.
    """
    pending_mode = None  # None, TITLE or ALLCAPS
    active_allcaps = pending_capnext = in_word = False
    for m in _DECODE_RE.finditer(text):
        tok, end = m.group(), m.end()
        c = tok[0]
        if c == ESC:
            if len(tok) == 1:
                raise ValueError(f"dangling escape at end of text (index {m.start()})")
            lit = tok[1]
            in_word = lit.isascii() and lit.isalpha()
            if not in_word:
                if pending_mode:
                    raise ValueError(f"case operator before non-letter at index {m.start()}")
                active_allcaps = False
            yield end, lit
        elif c == TITLE or c == ALLCAPS:
            if pending_mode or in_word or pending_capnext:
                raise ValueError(f"misplaced word operator at index {m.start()}")
            pending_mode = c
        elif c == CAPNEXT:
            if pending_capnext:
                raise ValueError(f"repeated CAPNEXT at index {m.start()}")
            pending_capnext = True
        elif c.isascii() and c.isalpha():
            if not in_word:  # word start
                upper = pending_mode is not None or pending_capnext
                active_allcaps = pending_mode == ALLCAPS
            else:
                if pending_mode:
                    raise ValueError(f"word operator inside a word at index {m.start()}")
                upper = active_allcaps or pending_capnext
            pending_mode, pending_capnext, in_word = None, False, True
            rest = tok[1:].upper() if active_allcaps else tok[1:]
            yield end, (c.upper() if upper else c) + rest
        else:
            if pending_mode or pending_capnext:
                raise ValueError(f"case operator before non-letter at index {m.start()}")
            in_word = active_allcaps = False
            yield end, tok
    if pending_mode or pending_capnext:
        raise ValueError("dangling case operator at end of text")


def decode(text: str) -> str:
    """Invert `encode`; raises ValueError on malformed input."""
    return "".join(out for _, out in _decode_tokens(text))


def piece_byte_counts(surfaces) -> list:
    """Original UTF-8 bytes per piece (operators 0, an escaped literal operator 3).

    `surfaces` are the ordered piece surfaces of a transformed text.  The
    decoder runs continuously across them; each decoded character's UTF-8
    length is charged to the piece holding its input character, so operators
    count 0 and an escaped operator 3 (on the piece of the operator, not ESC).
    """
    surfaces = list(surfaces)
    counts = [0] * len(surfaces)
    piece_end, p = [], 0  # piece_end[k]: input index just after piece k
    for s in surfaces:
        p += len(s)
        piece_end.append(p)
    k = 0  # current piece
    for end, out in _decode_tokens("".join(surfaces)):
        pos = end - len(out)  # input index of out[0]
        while out:
            while piece_end[k] <= pos:
                k += 1
            take = min(len(out), piece_end[k] - pos)
            chunk, out = out[:take], out[take:]
            counts[k] += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
            pos += take
    return counts


def casefold(text: str) -> str:
    """Lossy casefold variant (PR #1585): NFKC, then lowercase."""
    return unicodedata.normalize("NFKC", text).lower()
