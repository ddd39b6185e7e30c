"""prepare_caseops_data.py: shards, sidecars, split, workers, safety, errors, verify, hub layout."""
import gzip
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import lossless_caps as lc
import prepare_caseops_data as prep
from conftest import CASEOPS_TOKENIZER, REPO, SHARED_DATA, generated_docs

SCRIPT = REPO / "prepare_caseops_data.py"
PLAIN_1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
VAL_DOCS, SHARD = 20, 1500
# Hand-made val docs for the byte rules; expected = original bytes SentencePiece charges (SPEC 3.6).
CRAFTED = [
    ("  Leading and trailing spaces  \n", len("Leading and trailing spaces")),
    (f"Literal {lc.TITLE} TITLE and {lc.ESC} ESC in THE text", None),
    ("Emoji \U0001F9EA and é€ and CJK 漢字", None),
    ("x  spaces   runs\t\ttabs\n\nNew paragraph", None),
    ("\x01Deleted\x7f controls \x01", len("Deleted\x7f controls".encode())),
    ("Trailing control\x07\x1b", len("Trailing control\x07\x1b")),  # deleted chars stick to the last piece
    ("ＡＢＣ full width ﬁle", None),
    ("NASAｘ", None),  # NFKC turns ｘ into a letter of the ALLCAPS word: normalisation, not CaseOps, differs
    ("\u00a0No-break\u3000 space\u200b", len("No-break\u3000 space".encode())),
    ("", 0),
]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def run_main(args):
    """Run the CLI in-process; return (exit code, SystemExit message or None)."""
    try:
        return prep.main([str(a) for a in args]), None
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), (e.code if isinstance(e.code, str) else None)


def split_arrays(ds_dir, split):
    paths = sorted(Path(ds_dir).glob(prep.VAL_GLOB if split == "val" else prep.TRAIN_GLOB))
    return [prep.read_shard(p) for p in paths], paths


def docs_from_shards(tokens):
    starts = list(np.flatnonzero(tokens == prep.BOS_ID)) + [len(tokens)]
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("prep")


def shared_or_trained(shared, work, transform, vocab_size, n_docs):
    """The shared tokenizer file, or a small one trained here on generated docs."""
    if shared.exists():
        return shared
    docs = write_jsonl(work / f"gen_docs_{transform}.jsonl", generated_docs(n_docs))
    return prep.train_tokenizer(docs, transform, vocab_size, 0, None, 10_000, work / f"tok_{transform}", 2, False)


@pytest.fixture(scope="session")
def caseops_model(work):
    return shared_or_trained(CASEOPS_TOKENIZER, work, "caseops", 768, 200)


@pytest.fixture(scope="session")
def plain_model(work):
    """A tokenizer without CaseOps operators (shared SP1024, or trained here)."""
    return shared_or_trained(PLAIN_1024, work, "none", 400, 100)


@pytest.fixture(scope="session")
def corpus(docs):
    return [d for d, _ in CRAFTED] + docs[:40 - len(CRAFTED)]


@pytest.fixture(scope="session")
def docs_file(work, corpus):
    return write_jsonl(work / "docs.jsonl", corpus)


@pytest.fixture(scope="session")
def prepared(work, docs_file, caseops_model):
    root = work / "out1"
    rc, msg = run_main(["--docs", docs_file, "--out", root, "--tokenizer", caseops_model, "--val-docs", VAL_DOCS,
                        "--shard-tokens", SHARD, "--workers", 1])
    assert rc == 0, msg
    (ds_dir,) = (root / "datasets").iterdir()
    return root, ds_dir


@pytest.fixture(scope="session")
def sp(caseops_model):
    return spm.SentencePieceProcessor(model_file=str(caseops_model))


# ---------------------------------------------------------------- shard files and atomic writes

def test_shard_round_trip_and_header(tmp_path):
    values = np.array([0, 1, 65535, 7, 300], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    prep.write_shard(path, values)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(values)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert prep.read_shard(path).tolist() == values.tolist()
    path.write_bytes(raw[:-2])
    with pytest.raises(prep.DataError, match="entries"):
        prep.read_shard(path)
    path.write_bytes(b"\0" * 4 + raw[4:])
    with pytest.raises(prep.DataError, match="bad header"):
        prep.read_shard(path)
    with pytest.raises(ValueError):
        prep.write_shard(path, [70000])


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "fineweb_val_000000.bin"

    def chunks():
        yield b"x" * 100
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        prep.write_atomic(target, chunks())
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        prep.write_atomic(target, chunks())
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_killed_write_leaves_no_valid_looking_shard(tmp_path):
    target = tmp_path / "fineweb_train_000000.bin"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import prepare_caseops_data as p\n"
            "def chunks():\n    yield p.shard_header(10**6)\n    yield b'x' * 4096\n    time.sleep(60)\n"
            "p.write_atomic(sys.argv[2], chunks())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(target)])
    try:
        deadline = time.time() + 20
        while not list(tmp_path.glob(".*.tmp")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".*.tmp")), "the writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists()
    assert not list(tmp_path.glob(prep.TRAIN_GLOB)) and not list(tmp_path.glob("fineweb_*"))
    prep.prepare_output_dir(tmp_path, {"x": 1}, overwrite=False)  # the next run removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


# ---------------------------------------------------------------- layout, BOS, split

def test_layout_and_manifest(prepared, caseops_model, docs_file, sp):
    root, ds_dir = prepared
    vocab = sp.vocab_size()
    assert ds_dir.name == f"fineweb10B_sp{vocab}_lossless_caps_caseops_v1_reserved"
    assert (root / "tokenizers" / caseops_model.name).read_bytes() == caseops_model.read_bytes()
    m = json.loads((ds_dir / "manifest.json").read_text())
    assert m["complete"] and m["transform"] == "caseops" and m["val_docs"] == VAL_DOCS
    assert m["tokenizer"]["file"] == caseops_model.name
    assert m["tokenizer"]["sha256"] == prep.sha256_file(caseops_model)
    assert m["docs"]["sha256"] == prep.sha256_file(docs_file)
    assert m["stats"]["val"]["docs"] == VAL_DOCS and m["stats"]["train"]["docs"] == 40 - VAL_DOCS
    names = sorted(p.name for p in ds_dir.iterdir())
    val = [n for n in names if Path(n).match(m["val_glob"])]
    side = [n for n in names if Path(n).match(m["val_bytes_glob"])]
    train = [n for n in names if Path(n).match(m["train_glob"])]
    assert val and train and [n.replace("val_", "val_bytes_") for n in val] == side
    assert not set(val) & set(side)  # the val glob never picks up sidecars
    assert val == [prep.shard_name("val", i) for i in range(len(val))]
    assert train == [prep.shard_name("train", i) for i in range(len(train))]
    assert set(names) == set(val) | set(side) | set(train) | {"manifest.json"}  # no stray temp files
    tokens = sum(len(a) for a in split_arrays(ds_dir, "train")[0])
    assert m["stats"]["train"]["tokens"] == tokens
    assert m["stats"]["train"]["bytes"] == sum(len(d.encode()) for d in
                                               [json.loads(l)["text"] for l in open(docs_file)][VAL_DOCS:])


def test_shard_sizes_and_sidecar_lengths(prepared):
    _, ds_dir = prepared
    for split in ("val", "train"):
        arrays, paths = split_arrays(ds_dir, split)
        assert [len(a) for a in arrays[:-1]] == [SHARD] * (len(arrays) - 1)  # docs straddle: shards fill exactly
        assert 0 < len(arrays[-1]) <= SHARD
        if split == "val":
            for a, p in zip(arrays, paths):
                side = prep.read_shard(p.with_name(p.name.replace("val_", "val_bytes_")))
                assert len(side) == len(a)
    assert len(split_arrays(ds_dir, "train")[0]) >= 2


def test_bos_placement_and_split_rule(prepared, corpus, sp):
    _, ds_dir = prepared
    val = np.concatenate(split_arrays(ds_dir, "val")[0])
    train = np.concatenate(split_arrays(ds_dir, "train")[0])
    assert val[0] == prep.BOS_ID and train[0] == prep.BOS_ID  # val->train starts a new shard
    expected = [sp.encode(lc.encode(d)) for d in corpus]
    assert docs_from_shards(val) == expected[:VAL_DOCS]
    assert docs_from_shards(train) == expected[VAL_DOCS:]
    assert int((val == 1).sum()) == VAL_DOCS and int((train == 1).sum()) == len(corpus) - VAL_DOCS
    sidecar = np.concatenate([prep.read_shard(p) for p in sorted(ds_dir.glob(prep.VAL_BYTES_GLOB))])
    assert not sidecar[val == prep.BOS_ID].any()


# ---------------------------------------------------------------- byte sidecar (the BPB denominator)

def val_sidecar_per_doc(ds_dir):
    val = np.concatenate(split_arrays(ds_dir, "val")[0])
    side = np.concatenate([prep.read_shard(p) for p in sorted(ds_dir.glob(prep.VAL_BYTES_GLOB))]).astype(int)
    starts = list(np.flatnonzero(val == 1)) + [len(val)]
    return [(val[a + 1:b].tolist(), side[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_sidecar_sums_are_original_utf8_bytes(prepared, corpus, sp):
    _, ds_dir = prepared
    per_doc = val_sidecar_per_doc(ds_dir)
    assert len(per_doc) == VAL_DOCS
    strip = prep.StripRule(sp)
    for i, (doc, (_, side)) in enumerate(zip(corpus, per_doc)):
        want = CRAFTED[i][1] if i < len(CRAFTED) and CRAFTED[i][1] is not None else None
        if want is None and doc == doc.strip(" \t\n"):
            want = len(doc.encode("utf-8"))  # no leading/trailing whitespace: every byte is charged
        if want is None:
            want = len(doc.strip(" \t\n").encode("utf-8"))
        assert sum(side) == want == strip.charged_bytes(doc), (i, doc[:60])


def test_sidecar_matches_independent_offsets(prepared, corpus, sp):
    """Per token: bytes of the chars SentencePiece's own offsets assign it, operators 0 (no proto, no decoder)."""
    _, ds_dir = prepared
    try:
        sp.encode("a", out_type="offset_mapping")
    except (TypeError, ValueError, RuntimeError):
        pytest.skip("this sentencepiece has no offset_mapping")
    for doc, (ids, side) in zip(corpus, val_sidecar_per_doc(ds_dir)):
        text = lc.encode(doc)
        om = sp.encode(text, out_type="offset_mapping")
        assert om["ids"] == ids
        expected, escaped = [], False
        for a, b in om["offsets"]:
            n = 0
            for ch in text[a:b]:
                if ch in lc.OPERATORS and not escaped:
                    escaped = ch == lc.ESC
                else:
                    escaped, n = False, n + len(ch.encode())
            expected.append(n)
        assert side == expected


def test_operator_tokens_count_zero_and_escaped_three(prepared, sp):
    _, ds_dir = prepared
    ids, side = val_sidecar_per_doc(ds_dir)[1]  # CRAFTED[1] has a literal TITLE and ESC
    ops = [(i, c) for i, c in zip(ids, side) if 4 <= i <= 7]
    assert (7, 0) in ops and (4, 3) in ops and (7, 3) in ops and (4, 0) in ops


def test_byte_fallback_and_whitespace_rules(caseops_model, plain_model):
    for model, transform in ((caseops_model, "caseops"), (plain_model, "none")):
        sp = prep.load_tokenizer(model, transform)
        ids, counts = prep.encode_doc_with_bytes(sp, "a\U0001F9EAb", transform)
        byte_ids = [k for k, i in enumerate(ids) if sp.is_byte(i)]
        assert len(byte_ids) == 4  # the test char is in no vocab: 4 byte-fallback pieces
        assert [counts[k] for k in byte_ids] == [0, 0, 0, 4]  # whole char on the LAST byte piece
        text = "word   next\n\n\tline"
        ids, counts = prep.encode_doc_with_bytes(sp, text, transform)
        _, surfaces = prep.parse_pieces(sp.encode(text, out_type="serialized_proto"))
        assert b"".join(surfaces) == text.encode()
        runs = [s for s in surfaces if s.startswith(b"   ")]
        assert runs and all(counts[surfaces.index(s)] == len(s) for s in runs)  # run goes to the next piece
        assert sum(counts) == len(text)
    if CASEOPS_TOKENIZER.exists():  # the SPEC 3.5 example on the real tokenizer
        sp = prep.load_tokenizer(CASEOPS_TOKENIZER, "caseops")
        ids, counts = prep.encode_doc_with_bytes(sp, "x  spaces", "caseops")
        assert [sp.id_to_piece(i) for i in ids] == ["x", "▁spaces"] and counts == [1, 8]


def test_parse_pieces_matches_plain_encode(sp, corpus):
    strip = prep.StripRule(sp)
    for doc in corpus[:12]:
        text = lc.encode(doc)
        ids, surfaces = prep.parse_pieces(sp.encode(text, out_type="serialized_proto"))
        assert ids == sp.encode(text)
        i, k = strip.charged_span(text)
        assert b"".join(surfaces).decode() == text[i:k]  # surfaces tile the text minus the stripped edges


# ---------------------------------------------------------------- workers, reruns, verify

def test_worker_count_independence(work, docs_file, caseops_model, prepared):
    root2 = work / "out_w2"
    rc, msg = run_main(["--docs", docs_file, "--out", root2, "--tokenizer", caseops_model, "--val-docs", VAL_DOCS,
                        "--shard-tokens", SHARD, "--workers", 2, "--batch-docs", 3])
    assert rc == 0, msg
    ds1, ds2 = prepared[1], root2 / "datasets" / prepared[1].name
    shards = sorted(p.name for p in ds1.glob("fineweb_*.bin"))
    assert shards == sorted(p.name for p in ds2.glob("fineweb_*.bin"))
    for name in shards:
        assert (ds1 / name).read_bytes() == (ds2 / name).read_bytes(), name


def test_verify_passes_on_good_output(prepared, docs_file, capsys):
    root, ds_dir = prepared
    assert prep.verify(root, docs_file) == 0
    out = capsys.readouterr().out
    assert f"verify: docs={VAL_DOCS} " in out and "mismatches=0" in out
    assert "normalisation: 1)" in out  # only the NASAｘ doc
    assert run_main(["--verify", ds_dir, "--docs", docs_file]) == (0, None)


def corrupt_copy(prepared, tmp_path, shard_glob, index, delta):
    root = tmp_path / "copy"
    shutil.copytree(prepared[0], root)
    ds_dir = root / "datasets" / prepared[1].name
    path = sorted(ds_dir.glob(shard_glob))[0]
    values = prep.read_shard(path).astype(int)
    values[index] = (values[index] + delta) % 65536
    prep.write_shard(path, values)
    return root


def test_verify_catches_corrupted_sidecar(prepared, docs_file, tmp_path, capsys):
    root = corrupt_copy(prepared, tmp_path, prep.VAL_BYTES_GLOB, 5, 1)
    assert run_main(["--verify", root, "--docs", docs_file])[0] == 1
    out = capsys.readouterr().out
    assert "mismatches=1" in out and "doc 0: sidecar sum" in out


@pytest.mark.parametrize("index, delta, expected", [(3, 1, "doc 0: tokens do not decode"),
                                                     (0, 1, "val shards do not start with BOS"),
                                                     (0, 1, f"{VAL_DOCS - 1} BOS tokens in val shards")])
def test_verify_catches_corrupted_tokens(prepared, docs_file, tmp_path, capsys, index, delta, expected):
    root = corrupt_copy(prepared, tmp_path, prep.VAL_GLOB, index, delta)
    assert prep.verify(root, docs_file) > 0
    assert expected in capsys.readouterr().out


def test_rerun_safety(work, docs_file, caseops_model, prepared):
    root, ds_dir = prepared
    base = ["--docs", docs_file, "--out", root, "--tokenizer", caseops_model, "--shard-tokens", SHARD, "--workers", 1]
    before = {p.name: p.read_bytes() for p in ds_dir.glob("fineweb_*.bin")}
    assert run_main(base + ["--val-docs", VAL_DOCS]) == (0, None)  # same arguments: regenerated in place
    assert {p.name: p.read_bytes() for p in ds_dir.glob("fineweb_*.bin")} == before
    rc, msg = run_main(base + ["--val-docs", VAL_DOCS + 1])
    assert rc == 1 and "different run" in msg and "--overwrite" in msg
    assert {p.name: p.read_bytes() for p in ds_dir.glob("fineweb_*.bin")} == before  # untouched
    other = work / "out_overwrite"
    shutil.copytree(root, other)
    assert run_main(base[:2] + ["--out", other] + base[4:] + ["--val-docs", 5, "--overwrite"]) == (0, None)
    m = json.loads((other / "datasets" / ds_dir.name / "manifest.json").read_text())
    assert m["val_docs"] == 5 and m["stats"]["val"]["docs"] == 5


# ---------------------------------------------------------------- inputs and clear errors

def test_input_formats(tmp_path):
    docs = ["First doc", "Second \"quoted\" doc", "Third"]
    write_jsonl(tmp_path / "a.jsonl", docs)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    with lzma.open(tmp_path / "a.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write("\n" + "\n".join(json.dumps(d) for d in docs))  # bare JSON strings, leading blank line
    (tmp_path / "a.txt").write_bytes(b"First doc\r\n\nSecond \"quoted\" doc\n   \nThird")
    (tmp_path / "b.jsonl").write_text("First doc\n{not json here\nThird\n")  # first line not JSON: plain text
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz", "a.txt"):
        assert [t for _, t in prep.iter_docs(tmp_path / name)] == docs, name
    assert [n for n, _ in prep.iter_docs(tmp_path / "a.txt")] == [1, 3, 5]
    assert [t for _, t in prep.iter_docs(tmp_path / "b.jsonl")] == ["First doc", "{not json here", "Third"]


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "a"}\n\n{"text": oops}\n', ":3: invalid JSON"),
    (b'{"text": "a"}\n{"txt": "b"}\n', ":2: JSON line has no string field 'text'"),
    (b'{"text": 5}\n', ":1: JSON line has no string field 'text'"),
    (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', ":2: invalid UTF-8"),
    (b'{"text": "a\\ud800"}\n', ":1: text holds a lone surrogate"),
])
def test_bad_input_errors(tmp_path, caseops_model, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    rc, msg = run_main(["--docs", path, "--out", tmp_path / "o", "--tokenizer", caseops_model, "--workers", 1])
    assert rc == 1 and msg.startswith("error: ") and f"{path}{expected}" in msg


def test_bad_input_late_in_file_with_workers_no_traceback(tmp_path, caseops_model):
    lines = [json.dumps({"text": f"Doc number {i}. " * 20}) for i in range(300)] + ["{broken"]
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, SCRIPT, "--docs", path, "--out", tmp_path / "o", "--tokenizer",
                           caseops_model, "--workers", "2", "--batch-docs", "8", "--val-docs", "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and f"{path}:301: invalid JSON" in proc.stderr


@pytest.mark.parametrize("content, extra, expected", [
    (b"", [], "no documents (the file is empty"),
    (b"\n  \n\n", [], "no documents (the file is empty"),
    (b'{"text": "a"}\n{"text": "b"}\n', ["--val-docs", 2], "holds only 2 documents, all of them validation"),
    (b'{"text": "a"}\n{"text": "b"}\n', ["--val-docs", 5], "holds only 2 documents, all of them validation"),
    (b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n', ["--val-docs", 2, "--max-docs", 2],
     "--max-docs 2 leaves no train documents after --val-docs 2"),
])
def test_no_train_docs_is_refused_before_writing(tmp_path, caseops_model, content, extra, expected):
    """Without train docs the run used to exit 0 with a manifest marked complete: now nothing is written."""
    path = tmp_path / "few.jsonl"
    path.write_bytes(content)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, SCRIPT, "--docs", path, "--out", out, "--tokenizer", caseops_model,
                           "--workers", "1", *map(str, extra)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ") and expected in proc.stderr
    assert not out.exists()  # not even the tokenizer copy


def test_one_train_doc_is_enough(tmp_path, caseops_model):
    path = write_jsonl(tmp_path / "three.jsonl", ["First doc.", "Second doc.", "Third doc."])
    args = ["--docs", path, "--out", tmp_path / "o", "--tokenizer", caseops_model, "--workers", 1, "--val-docs", 2]
    assert run_main(args) == (0, None)
    (ds_dir,) = (tmp_path / "o" / "datasets").iterdir()
    m = json.loads((ds_dir / "manifest.json").read_text())
    assert m["complete"] and m["stats"]["val"]["docs"] == 2 and m["stats"]["train"]["docs"] == 1
    assert run_main(args[:2] + ["--out", tmp_path / "o2"] + args[4:] + ["--max-docs", 3]) == (0, None)


def test_records_sp_flag_names_the_tokenizer(tmp_path, caseops_model):
    """The records' command line (`--docs D --out O --sp MODEL --val-docs N`) works unchanged."""
    path = write_jsonl(tmp_path / "three.jsonl", ["First doc.", "Second doc.", "Third doc."])
    assert run_main(["--docs", path, "--out", tmp_path / "o", "--sp", caseops_model, "--val-docs", 1]) == (0, None)
    (ds_dir,) = (tmp_path / "o" / "datasets").iterdir()
    assert json.loads((ds_dir / "manifest.json").read_text())["stats"]["train"]["docs"] == 2


def test_tokenizer_transform_mismatch(tmp_path, docs_file, plain_model):
    rc, msg = run_main(["--docs", docs_file, "--out", tmp_path, "--tokenizer", plain_model, "--transform", "caseops"])
    assert rc == 1 and "does not reserve the CaseOps operators at ids 4-7" in msg


def test_other_usage_errors(tmp_path, docs_file, caseops_model):
    cases = [
        (["--docs", docs_file, "--out", tmp_path, "--train-tokenizer", "--vocab-size", 70000], "65535"),
        (["--docs", tmp_path / "missing.jsonl", "--out", tmp_path, "--tokenizer", caseops_model], "not found"),
        (["--docs", docs_file, "--out", tmp_path], "exactly one of --tokenizer"),
        (["--docs", docs_file, "--out", tmp_path, "--tokenizer", tmp_path / "none.model"], "tokenizer not found"),
        (["--verify", tmp_path, "--docs", docs_file], "exactly one datasets/<dir>"),
    ]
    for args, expected in cases:
        rc, msg = run_main(args)
        assert rc == 1 and expected in msg, (args, msg)


# ---------------------------------------------------------------- transforms and tokenizer training

def test_casefold_and_none_transforms(tmp_path, docs_file, corpus, plain_model, capsys):
    sp = spm.SentencePieceProcessor(model_file=str(plain_model))
    strip = prep.StripRule(sp)
    for transform, suffix in (("casefold", "_casefold"), ("none", "")):
        root = tmp_path / transform
        args = ["--docs", docs_file, "--out", root, "--tokenizer", plain_model, "--transform", transform,
                "--val-docs", 10, "--shard-tokens", SHARD, "--workers", 1]
        assert run_main(args) == (0, None)
        ds_dir = root / "datasets" / f"fineweb10B_sp{sp.vocab_size()}{suffix}"
        m = json.loads((ds_dir / "manifest.json").read_text())
        assert m["transform"] == transform and m.get("lossy", False) == (transform == "casefold")
        per_doc = val_sidecar_per_doc(ds_dir)
        fn = prep.TRANSFORMS[transform]
        assert [sum(s) for _, s in per_doc] == [strip.charged_bytes(fn(d)) for d in corpus[:10]]
        assert [ids for ids, _ in per_doc] == [sp.encode(fn(d)) for d in corpus[:10]]
        assert prep.verify(root, docs_file) == 0
    err = capsys.readouterr().err
    assert "lossy casefold transform; its legality was never ruled on" in err
    cf = json.loads((tmp_path / "casefold/datasets" / f"fineweb10B_sp{sp.vocab_size()}_casefold/manifest.json").read_text())
    assert cf["lossy"] is True and cf["legality"] == prep.CASEFOLD_LEGALITY


def test_train_tokenizer_cli(tmp_path, docs):
    secret = "zqxjvk"  # only in val docs: must never become a piece
    corpus = [f"{secret}{secret} " * 200] * 5 + docs[:60]
    docs_path = write_jsonl(tmp_path / "d.jsonl", corpus)
    args = ["--docs", docs_path, "--out", tmp_path / "o", "--train-tokenizer", "--vocab-size", 420,
            "--val-docs", 5, "--shard-tokens", 100000, "--workers", 2]
    assert run_main(args) == (0, None)
    model = tmp_path / "o/tokenizers/fineweb_420_bpe_lossless_caps_caseops_v1_reserved.model"
    assert model.exists() and model.with_suffix(".vocab").exists()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 420 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *lc.OPERATORS]
    assert all(sp.is_byte(i) for i in range(8, 264))
    pieces = [sp.id_to_piece(i) for i in range(264, 420)]
    assert not any(secret[:3] in p for p in pieces)
    assert not any(c.isascii() and c.isupper() for p in pieces for c in p)  # trained on transformed text
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert sp.encode("ﬁ", out_type=str) == sp.encode("fi", out_type=str)  # nmt_nfkc
    assert (tmp_path / "o/datasets/fineweb10B_sp420_lossless_caps_caseops_v1_reserved/manifest.json").exists()
    rc, msg = run_main(args)  # an existing trained model is not silently replaced
    assert rc == 1 and "--overwrite" in msg
    assert not list((tmp_path / "o/tokenizers").glob(".train_*"))


# ---------------------------------------------------------------- hub layout (no network)

HUB_MANIFEST = {
    "datasets": [{"name": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "tokenizer_name": "sp8192_caseops",
                  "stats": {"files_val": 1, "files_train": 80}}],
    "tokenizers": [{"name": "sp8192_caseops",
                    "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                    "vocab_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab"}],
}


def test_hub_caseops_plan_maps_to_local_layout():
    d = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    plan = prep.hub_caseops_plan(HUB_MANIFEST, 2)
    assert plan == [
        (f"datasets/datasets/{d}/fineweb_val_000000.bin", f"datasets/{d}/fineweb_val_000000.bin"),
        (f"datasets/datasets/{d}/fineweb_val_bytes_000000.bin", f"datasets/{d}/fineweb_val_bytes_000000.bin"),
        (f"datasets/datasets/{d}/fineweb_train_000000.bin", f"datasets/{d}/fineweb_train_000000.bin"),
        (f"datasets/datasets/{d}/fineweb_train_000001.bin", f"datasets/{d}/fineweb_train_000001.bin"),
        ("datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
         "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
        ("datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab",
         "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab"),
    ]
    # the same dataset dir and tokenizer names as a local prepare
    assert d == prep.dataset_dir_name("caseops", 8192)
    assert plan[-2][1] == "tokenizers/" + prep.tokenizer_file_name("caseops", 8192)
    assert len(prep.hub_caseops_plan(HUB_MANIFEST, None)) == 2 + 80 + 2  # default: every train shard
    assert len(prep.hub_caseops_plan(None, 3)) == 2 + 3 + 2
    with pytest.raises(prep.DataError, match="only 80"):
        prep.hub_caseops_plan(HUB_MANIFEST, 81)
    with pytest.raises(prep.DataError, match="--train-shards"):
        prep.hub_caseops_plan(None, None)
    assert prep.hub_docs_plan()[1] == ("datasets/docs_selected.jsonl", "docs_selected.jsonl")


@pytest.mark.parametrize("hub_args", [["--from-hub", "caseops", "--train-shards", "1"],
                                      ["--from-hub", "docs", "--train-tokenizer", "--vocab-size", "1024"]])
def test_hub_offline_fails_with_one_sentence(tmp_path, hub_args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, SCRIPT, "--out", tmp_path / "o", *hub_args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download datasets/") and "parameter-golf" in last
    assert not list((tmp_path / "o").rglob("*.bin")) and not list((tmp_path / "o").rglob(".hub_staging"))


class FakeHub(dict):
    """{repo: {remote path: local file}}, the remote paths requested, and those that break mid-transfer."""

    def __init__(self):
        super().__init__()
        self.calls, self.broken = [], set()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace hf_hub_download with a copy from a local FakeHub table."""
    import huggingface_hub
    repos = FakeHub()

    def fake_download(repo_id, filename, repo_type, local_dir):
        assert repo_type == "dataset"
        repos.calls.append(filename)
        if filename in repos.broken:  # like the real client: a partial file in local_dir, then the error
            partial = Path(local_dir) / ".cache/huggingface/download" / f"{Path(filename).name}.incomplete"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"half a shard")
            raise ConnectionError("connection reset by peer")
        if filename not in repos.get(repo_id, {}):
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repos[repo_id][filename], dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return repos


def fake_caseops_export(prepared, tmp_path):
    """A hub table of the CaseOps export (3 train shards) built from the prepared dataset; returns (files, model)."""
    src_root, src_ds = prepared
    d = prep.dataset_dir_name("caseops", 8192)
    manifest = tmp_path / "hub_manifest.json"
    manifest.write_text(json.dumps({**HUB_MANIFEST, "datasets": [{**HUB_MANIFEST["datasets"][0],
                                                                  "stats": {"files_val": 1, "files_train": 3}}]}))
    model = next((src_root / "tokenizers").glob("*.model"))
    files = {"datasets/manifest.json": manifest,
             f"datasets/tokenizers/{prep.tokenizer_file_name('caseops', 8192)}": model,
             "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab": manifest}
    # one big val shard (all 20 val docs) so that the fake export is a complete val set
    val = np.concatenate(split_arrays(src_ds, "val")[0])
    side = np.concatenate([prep.read_shard(p) for p in sorted(src_ds.glob(prep.VAL_BYTES_GLOB))])
    prep.write_shard(tmp_path / "v.bin", val)
    prep.write_shard(tmp_path / "vb.bin", side)
    files[f"datasets/datasets/{d}/fineweb_val_000000.bin"] = tmp_path / "v.bin"
    files[f"datasets/datasets/{d}/fineweb_val_bytes_000000.bin"] = tmp_path / "vb.bin"
    for i, path in enumerate(split_arrays(src_ds, "train")[1][:3]):
        files[f"datasets/datasets/{d}/fineweb_train_{i:06d}.bin"] = path
    return files, model


def test_from_hub_caseops_ends_in_local_layout(prepared, docs_file, tmp_path, fake_hub):
    d = prep.dataset_dir_name("caseops", 8192)
    files, model = fake_caseops_export(prepared, tmp_path)
    fake_hub[prep.HUB_CASEOPS_REPO] = files
    root = tmp_path / "hub"
    assert run_main(["--from-hub", "caseops", "--train-shards", 2, "--out", root]) == (0, None)
    assert sorted(p.name for p in (root / "datasets" / d).iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
        "fineweb_val_bytes_000000.bin", "manifest.json"]
    assert (root / "tokenizers" / prep.tokenizer_file_name("caseops", 8192)).read_bytes() == model.read_bytes()
    assert not list(root.rglob(".hub_staging"))
    m = json.loads((root / "datasets" / d / "manifest.json").read_text())
    assert m["stats"]["val"]["docs"] == VAL_DOCS and m["stats"]["train"]["shards"] == 2
    assert prep.verify(root, docs_file) == 0  # downloaded data passes the same checks as local data


def test_failed_hub_download_leaves_no_staging_and_rerun_resumes(prepared, tmp_path, fake_hub):
    d = prep.dataset_dir_name("caseops", 8192)
    fake_hub[prep.HUB_CASEOPS_REPO] = fake_caseops_export(prepared, tmp_path)[0]
    broken = f"datasets/datasets/{d}/fineweb_train_000001.bin"
    fake_hub.broken.add(broken)
    root = tmp_path / "hub"
    args = ["--from-hub", "caseops", "--train-shards", 2, "--out", root]
    rc, msg = run_main(args)
    assert rc == 1 and msg.startswith(f"error: could not download {broken} ") and "(ConnectionError)" in msg
    assert "rerun the same command (files already downloaded are kept)" in msg
    assert not list(root.rglob(".hub_staging")) and not list(root.rglob("*.incomplete"))
    assert (root / "datasets" / d / "fineweb_train_000000.bin").exists()
    assert not (root / "datasets" / d / "fineweb_train_000001.bin").exists()
    fake_hub.broken.clear()
    done = set(fake_hub.calls) - {broken}
    fake_hub.calls.clear()
    assert run_main(args) == (0, None)
    assert broken in fake_hub.calls and not done & set(fake_hub.calls)  # finished files are not fetched again
    assert not list(root.rglob(".hub_staging"))


def test_failed_hub_docs_download_leaves_no_staging(docs_file, caseops_model, tmp_path, fake_hub):
    fake_hub[prep.HUB_DOCS_REPO] = {"datasets/docs_selected.jsonl": docs_file}
    fake_hub.broken.add("datasets/docs_selected.jsonl")
    root = tmp_path / "hubdocs"
    rc, msg = run_main(["--from-hub", "docs", "--out", root, "--tokenizer", caseops_model, "--workers", 1])
    assert rc == 1 and msg.startswith("error: could not download datasets/docs_selected.jsonl ")
    assert not list(root.rglob(".hub_staging")) and not list(root.iterdir())


def test_from_hub_docs_uses_source_manifest(docs_file, caseops_model, tmp_path, fake_hub):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"num_docs": 40, "docs_val": 7, "docs_sha256": "x"}))
    fake_hub[prep.HUB_DOCS_REPO] = {"datasets/docs_selected.jsonl": docs_file,
                                    "datasets/docs_selected.source_manifest.json": meta}
    root = tmp_path / "hubdocs"
    args = ["--from-hub", "docs", "--out", root, "--tokenizer", caseops_model, "--shard-tokens", SHARD, "--workers", 1]
    assert run_main(args) == (0, None)
    assert (root / "docs_selected.jsonl").read_bytes() == docs_file.read_bytes()
    (ds_dir,) = (root / "datasets").iterdir()
    m = json.loads((ds_dir / "manifest.json").read_text())
    assert m["val_docs"] == 7 and m["stats"]["val"]["docs"] == 7 and m["stats"]["train"]["docs"] == 33
    assert m["source"]["hub_repo"] == prep.HUB_DOCS_REPO
    del fake_hub[prep.HUB_DOCS_REPO]["datasets/docs_selected.source_manifest.json"]  # optional file
    assert run_main(args[:2] + ["--out", tmp_path / "hubdocs2"] + args[4:] + ["--val-docs", 3]) == (0, None)


def test_verify_accepts_nfkc_letter_next_to_operator(work, caseops_model, capsys):
    """FineWeb doc 61 of the sample: NFKC turns U+00BA into 'o' right before a TITLE operator, so the tokens
    describe text CaseOps cannot decode. That is normalisation, not a byte error: verify passes and counts it."""
    docs = ["Measurement accuracy \u00b10.3\u00baC Measured daily.", "A plain Second doc.", "A train doc."]
    docs_file = write_jsonl(work / "nfkc_docs.jsonl", docs)
    root = work / "out_nfkc"
    assert run_main(["--docs", docs_file, "--out", root, "--tokenizer", caseops_model, "--val-docs", 2,
                     "--shard-tokens", SHARD, "--workers", 1]) == (0, None)
    assert prep.verify(root, docs_file) == 0
    out = capsys.readouterr().out
    assert "mismatches=0" in out and "normalisation: 1)" in out
    (ds_dir,) = (root / "datasets").iterdir()
    path = sorted(ds_dir.glob(prep.VAL_BYTES_GLOB))[0]
    values = prep.read_shard(path).astype(int)
    values[3] += 1  # a real byte error in the same doc is still caught
    prep.write_shard(path, values)
    assert prep.verify(root, docs_file) > 0
