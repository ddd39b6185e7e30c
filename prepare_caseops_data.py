#!/usr/bin/env python3
"""Tokenize a document stream into Parameter Golf shards (the CaseOps records' export, PR #1736).

    prepare:  --docs FILE --out ROOT (--tokenizer MODEL | --train-tokenizer --vocab-size N)
              [--transform caseops|casefold|none] [--val-docs 50000] [--shard-tokens 100000000]
              [--workers K] [--max-docs N] [--overwrite]
    download: --from-hub caseops [--train-shards N] --out ROOT
              --from-hub docs --out ROOT (--tokenizer MODEL | --train-tokenizer --vocab-size N) [...]
    check:    --verify ROOT --docs FILE

Per document: transform -> SentencePiece -> prepend BOS (id 1).  The first
--val-docs documents go to val shards with a byte sidecar (original UTF-8
bytes per token, 0 at BOS and operators), the rest to train shards, in order.
Output layout: ROOT/datasets/<dataset dir>/{fineweb_*.bin, manifest.json} and
ROOT/tokenizers/<model>.  See docs/DATA.md.
"""
import argparse
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing as mp
import os
import shutil
import sys
import unicodedata
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import lossless_caps

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 65535  # ids must fit in uint16
TRANSFORMS = {"caseops": lossless_caps.encode, "casefold": lossless_caps.casefold, "none": lambda text: text}
TEXT_TRANSFORM_NAMES = {"caseops": lossless_caps.TRANSFORM_NAME, "casefold": "casefold_nfkc_lower", "none": "identity"}
CASEFOLD_LEGALITY = "lossy casefold transform; its legality was never ruled on"
TRAIN_GLOB = "fineweb_train_*.bin"
VAL_GLOB = "fineweb_val_[0-9][0-9][0-9][0-9][0-9][0-9].bin"  # six digits: never matches the sidecars
VAL_BYTES_GLOB = "fineweb_val_bytes_*.bin"
HUB_CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"
HUB_DOCS_REPO = "willdepueoai/parameter-golf"
HUB_ROOT = "datasets"


class DataError(Exception):
    """A user-facing problem; the CLI prints it as one line and exits 1.

    An Exception (not SystemExit) so that it crosses multiprocessing.Pool's
    task-feeding thread and is re-raised in the main loop.
    """


# ---------------------------------------------------------------- names and layout

def dataset_dir_name(transform: str, vocab_size: int) -> str:
    suffix = {"caseops": "_lossless_caps_caseops_v1_reserved", "casefold": "_casefold", "none": ""}[transform]
    return f"fineweb10B_sp{vocab_size}{suffix}"


def tokenizer_file_name(transform: str, vocab_size: int) -> str:
    suffix = {"caseops": "_lossless_caps_caseops_v1_reserved", "casefold": "_casefold", "none": ""}[transform]
    return f"fineweb_{vocab_size}_bpe{suffix}.model"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


# ---------------------------------------------------------------- shard files

def write_atomic(path: Path, chunks) -> None:
    """Write `chunks` (bytes-like) to `path` so that it appears complete or not at all.

    The temp name starts with a dot and ends in .tmp, so no shard glob matches
    a half-written file even if the process is killed mid-write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_header(n: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, n)
    return header.tobytes()


def write_shard(path: Path, values) -> None:
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{path}: values outside uint16")
    write_atomic(path, [shard_header(values.size), values.astype("<u2").tobytes()])


def read_shard(path: Path) -> np.ndarray:
    """Read a shard, rejecting bad magic/version or a size other than 1024 + 2N."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_BYTES:
        raise DataError(f"{path}: shorter than the {HEADER_BYTES}-byte header")
    magic, version, n = np.frombuffer(data, dtype="<i4", count=3)
    if magic != MAGIC or version != VERSION:
        raise DataError(f"{path}: bad header (magic {magic}, version {version})")
    if len(data) != HEADER_BYTES + 2 * int(n):
        raise DataError(f"{path}: header says {n} entries but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype="<u2", offset=HEADER_BYTES).copy()


class ShardWriter:
    """Buffers token (and sidecar) arrays and emits shards of exactly `shard_tokens` entries."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, with_sidecar: bool):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.with_sidecar = with_sidecar
        self.tokens, self.sidecar, self.buffered, self.shards = [], [], 0, 0

    def add(self, tokens: np.ndarray, sidecar: np.ndarray = None) -> None:
        self.tokens.append(tokens)
        if self.with_sidecar:
            assert sidecar is not None and len(sidecar) == len(tokens)
            self.sidecar.append(sidecar)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._emit(self.shard_tokens)

    def close(self) -> None:
        if self.buffered:
            self._emit(self.buffered)

    def _emit(self, n: int) -> None:
        tokens = np.concatenate(self.tokens)
        self.tokens = [tokens[n:]]
        write_shard(self.out_dir / shard_name(self.split, self.shards), tokens[:n])
        if self.with_sidecar:
            sidecar = np.concatenate(self.sidecar)
            self.sidecar = [sidecar[n:]]
            write_shard(self.out_dir / f"fineweb_val_bytes_{self.shards:06d}.bin", sidecar[:n])
        self.buffered -= n
        self.shards += 1


# ---------------------------------------------------------------- reading documents

def _open_binary(path: Path):
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _looks_like_jsonl(path: Path) -> bool:
    return any(str(path).endswith(ext) for ext in (".jsonl", ".jsonl.gz", ".jsonl.xz", ".json"))


def iter_docs(path):
    """Yield (line_number, text) for every document of a docs file, streaming.

    .jsonl[.gz|.xz]: JSON objects with a string `text` (or bare JSON strings),
    unless the first non-blank line is not JSON, in which case the file is
    read as plain text.  Other files: plain text, one document per line.
    Blank lines are skipped.  Bad input raises DataError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"docs file not found: {path}")
    mode = None
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                if mode is None:
                    mode = "json" if _looks_like_jsonl(path) and _is_json(line) else "text"
                text = _json_text(line, path, lineno) if mode == "json" else line.rstrip("\n").removesuffix("\r")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f"{path}:{lineno}: text holds a lone surrogate (not valid Unicode)") from None
                yield lineno, text
        except (EOFError, OSError, lzma.LZMAError) as e:
            raise DataError(f"{path}: cannot read compressed stream ({e})") from None


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _json_text(line: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise DataError(f"{path}:{lineno}: JSON line has no string field 'text'")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- SentencePiece

def parse_pieces(buf: bytes):
    """(ids, surfaces as bytes) from a serialized SentencePieceText proto.

    `encode(text, out_type='serialized_proto')` exists in sentencepiece 0.2.2
    and 0.2.3 and, unlike 'proto'/'immutable_proto', needs no protobuf package,
    so we read the wire format ourselves: SentencePieceText.pieces = field 2,
    and in each piece id = field 2 (varint), surface = field 3 (bytes).  The
    loop is inlined because it dominates the cost of a validation doc.
    """
    ids, surfaces = [], []
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            length, i = _varint(buf, i)
            if key == 0x12:  # a piece: scan its fields
                j, end, pid, surface = i, i + length, 0, b""
                while j < end:
                    k = buf[j]
                    j += 1
                    if k & 7 == 0:
                        if k == 0x10:  # id
                            pid, j = _varint(buf, j)
                        else:  # begin/end offsets: skip the varint
                            while buf[j] & 0x80:
                                j += 1
                            j += 1
                    else:
                        size, j = _varint(buf, j)
                        if k == 0x1A:  # surface
                            surface = buf[j:j + size]
                        j += size
                ids.append(pid)
                surfaces.append(surface)
            i += length
    return ids, surfaces


def _varint(buf: bytes, i: int):
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def load_tokenizer(path: Path, transform: str):
    """Load a model and check it fits the shard format and the transform."""
    import sentencepiece as spm
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise DataError(f"cannot load tokenizer {path}: {e}") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise DataError(f"tokenizer {path.name} has {sp.vocab_size()} pieces; shards store uint16 ids (at most {MAX_VOCAB})")
    if sp.bos_id() != BOS_ID:
        raise DataError(f"tokenizer {path.name} has bos_id {sp.bos_id()}; the shard format needs BOS = {BOS_ID}")
    found = [sp.id_to_piece(i) for i in range(4, 8)] if sp.vocab_size() >= 8 else []
    has_ops = found == list(lossless_caps.OPERATORS)
    if transform == "caseops" and not has_ops:
        raise DataError(f"tokenizer {path.name} does not reserve the CaseOps operators at ids 4-7 "
                        f"(found {found!r}); use a *_lossless_caps_caseops_v1_reserved model or another --transform")
    if transform != "caseops" and has_ops:
        print(f"warning: tokenizer {path.name} reserves CaseOps operators but --transform is {transform}", file=sys.stderr)
    return sp


def train_tokenizer(docs_path, transform, vocab_size, val_docs, max_docs, train_docs_limit, out_dir, threads, overwrite):
    """Train SentencePiece BPE (the records' settings) on transformed TRAIN docs only; return the model path."""
    import sentencepiece as spm
    if not 8 + 256 < vocab_size <= MAX_VOCAB:
        raise DataError(f"--vocab-size must be in 265..{MAX_VOCAB} (8 reserved ids + 256 byte pieces + merges)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / tokenizer_file_name(transform, vocab_size)
    if model.exists() and not overwrite:
        raise DataError(f"{model} exists; pass --tokenizer {model} to reuse it or --overwrite to retrain")
    transform_fn = TRANSFORMS[transform]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".train_") as tmp:
        text_file, n = Path(tmp) / "train.txt", 0
        with open(text_file, "w", encoding="utf-8") as f:
            for index, (_, doc) in enumerate(iter_docs(docs_path)):
                if n >= train_docs_limit or (max_docs is not None and index >= max_docs):
                    break
                if index < val_docs:  # the tokenizer never sees validation docs
                    continue
                text = transform_fn(doc).replace("\0", " ").strip()
                if text:
                    f.write(text + "\n")
                    n += 1
        if n == 0:
            raise DataError("no training documents for the tokenizer (every document is a validation document)")
        print(f"training tokenizer {model.name} on {n} docs", file=sys.stderr)
        prefix = Path(tmp) / "model"
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, remove_extra_whitespaces=True,
            hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            user_defined_symbols=list(lossless_caps.OPERATORS) if transform == "caseops" else [],
            max_sentence_length=16384, num_threads=max(1, threads), minloglevel=2)
        os.replace(f"{prefix}.model", model)
        os.replace(f"{prefix}.vocab", model.with_suffix(".vocab"))
    load_tokenizer(model, transform)  # ids 4-7 must be the operators for caseops
    return model


def install_tokenizer(src: Path, out_dir: Path, overwrite: bool) -> Path:
    """Copy a model (and its .vocab if present) into ROOT/tokenizers/."""
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (src, src.with_suffix(".vocab")):
        dest = out_dir / path.name
        if not path.is_file() or (dest.exists() and dest.samefile(path)):
            continue
        if dest.exists() and sha256_file(dest) != sha256_file(path) and not overwrite:
            raise DataError(f"{dest} exists with different content; pass --overwrite to replace it")
        write_atomic(dest, [path.read_bytes()])
    return out_dir / src.name


# ---------------------------------------------------------------- per-batch work (worker processes)

_WORKER = {}


def _init_worker(model_path: str, transform: str) -> None:
    import sentencepiece as spm
    _WORKER["sp"] = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER["transform"] = transform


def encode_doc_with_bytes(sp, text: str, transform: str):
    """Token ids and original-byte count per token for one transformed doc (no BOS)."""
    ids, surfaces = parse_pieces(sp.encode(text, out_type="serialized_proto"))
    if transform == "caseops":
        counts = lossless_caps.piece_byte_counts([s.decode("utf-8") for s in surfaces])
    else:  # the surface IS the (transformed) text the piece covers
        counts = [len(s) for s in surfaces]
    return ids, counts


def process_batch(job):
    """Encode one batch of docs of one split; returns (split, tokens, sidecar|None, docs, bytes)."""
    split, texts = job
    sp, transform = _WORKER["sp"], _WORKER["transform"]
    transformed = [TRANSFORMS[transform](t) for t in texts]
    flat_ids, flat_counts = [], []
    if split == "val":
        for text in transformed:
            ids, counts = encode_doc_with_bytes(sp, text, transform)
            if len(ids) != len(counts):
                raise AssertionError("token and byte-count lengths differ")
            flat_ids += [BOS_ID] + ids
            flat_counts += [0] + counts
        sidecar = np.array(flat_counts, dtype=np.int64)
        if sidecar.size and sidecar.max() >= 65536:
            raise AssertionError("a byte count does not fit in uint16")
        nbytes = int(sidecar.sum())
        sidecar = sidecar.astype(np.uint16)
    else:
        for ids in sp.encode(transformed, num_threads=1):  # parallelism comes from the worker processes
            flat_ids.append(BOS_ID)
            flat_ids += ids
        sidecar, nbytes = None, sum(len(t.encode("utf-8")) for t in texts)
    return split, np.array(flat_ids, dtype=np.uint16), sidecar, len(texts), nbytes


def make_batches(docs, val_docs: int, batch_docs: int, max_docs, batch_chars=1 << 20):
    """Group (lineno, text) into (split, [texts]) batches that never mix val and train.

    Batches are capped in docs and in characters so that workers stay evenly
    loaded whether docs are short or long.
    """
    batch, split, chars = [], "val", 0
    for index, (_, text) in enumerate(docs):
        if max_docs is not None and index >= max_docs:
            break
        doc_split = "val" if index < val_docs else "train"
        if batch and (doc_split != split or len(batch) >= batch_docs or chars >= batch_chars):
            yield split, batch
            batch, chars = [], 0
        split = doc_split
        batch.append(text)
        chars += len(text)
    if batch:
        yield split, batch


def run_ordered(jobs, model_path: str, transform: str, workers: int):
    """process_batch over jobs in input order, on `workers` processes, with bounded memory."""
    if workers <= 1:
        _init_worker(model_path, transform)
        yield from map(process_batch, jobs)
        return
    slots = threading.Semaphore(4 * workers)  # batches read but not yet written
    stop = threading.Event()

    def gated():  # runs in the pool's feeder thread; must not block forever on shutdown
        for job in jobs:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield job

    with mp.Pool(workers, initializer=_init_worker, initargs=(model_path, transform)) as pool:
        try:
            for result in pool.imap(process_batch, gated()):
                yield result
                slots.release()
        finally:
            stop.set()


class Progress:
    """tqdm on stderr if installed, else a plain status line every few seconds."""

    def __init__(self, total):
        self.total, self.docs, self.bytes, self.start, self.last = total, 0, 0, time.time(), 0.0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="doc", file=sys.stderr, smoothing=0.1, mininterval=1.0)
        except ImportError:
            self.bar = None

    def update(self, docs: int, nbytes: int) -> None:
        self.docs, self.bytes = self.docs + docs, self.bytes + nbytes
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.2f} MB/s", refresh=False)
        elif time.time() - self.last > 5:
            self.last = time.time()
            eta = f" ETA {(self.total - self.docs) * elapsed / self.docs:.0f}s" if self.total else ""
            print(f"{self.docs} docs {self.docs / elapsed:.0f} docs/s {self.bytes / elapsed / 1e6:.2f} MB/s{eta}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_pipeline(docs_path, model_path, transform, out_dir, val_docs, shard_tokens, workers,
                 max_docs=None, batch_docs=128, total_docs=None):
    """Stream docs -> shards in out_dir; return per-split stats."""
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens, True),
               "train": ShardWriter(out_dir, "train", shard_tokens, False)}
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "shards": 0} for s in writers}
    jobs = make_batches(iter_docs(docs_path), val_docs, batch_docs, max_docs)
    total = min(x for x in (total_docs, max_docs) if x is not None) if (total_docs or max_docs) else None
    progress, val_open = Progress(total), True
    start = time.time()
    try:
        for split, tokens, sidecar, ndocs, nbytes in run_ordered(jobs, str(model_path), transform, workers):
            if split == "train" and val_open:  # the val->train switch starts a new shard
                writers["val"].close()
                val_open = False
            writers[split].add(tokens, sidecar)
            for key, value in (("docs", ndocs), ("tokens", len(tokens)), ("bytes", nbytes)):
                stats[split][key] += value
            progress.update(ndocs, nbytes)
        if val_open:
            writers["val"].close()
        writers["train"].close()
    finally:
        progress.close()
    for split, writer in writers.items():
        stats[split]["shards"] = writer.shards
    stats["seconds"] = round(time.time() - start, 3)
    return stats


# ---------------------------------------------------------------- output directory safety and manifest

def prepare_output_dir(ds_dir: Path, fingerprint: dict, overwrite: bool) -> None:
    """Refuse to mix runs: shards of another run are only replaced with --overwrite."""
    ds_dir.mkdir(parents=True, exist_ok=True)
    for stale in ds_dir.glob(".fineweb_*.tmp"):  # left by a killed run
        stale.unlink()
    shards = sorted(ds_dir.glob("fineweb_*.bin"))
    manifest_path = ds_dir / "manifest.json"
    if shards:
        old = _read_json(manifest_path)
        if not overwrite and (old or {}).get("fingerprint") != fingerprint:
            raise DataError(f"{ds_dir} holds shards of a different run (its manifest.json differs or is missing); "
                            "pass --overwrite to replace them")
        for path in shards:
            path.unlink()
    # Written before any shard, so a killed run can be re-run with the same arguments.
    write_json(manifest_path, {"complete": False, "fingerprint": fingerprint})


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    write_atomic(path, [(json.dumps(obj, indent=2) + "\n").encode("utf-8")])


def build_manifest(ds_dir, transform, model_path, docs_path, docs_sha, tok_sha, vocab, val_docs, shard_tokens,
                   stats, fingerprint, extra=None):
    manifest = {
        "name": ds_dir.name,
        "complete": True,
        "transform": transform,
        "text_transform": TEXT_TRANSFORM_NAMES[transform],
        "tokenizer": {"file": Path(model_path).name, "sha256": tok_sha, "vocab_size": vocab,
                      "path": f"../../tokenizers/{Path(model_path).name}"},
        "docs": {"file": str(docs_path), "sha256": docs_sha},
        "val_docs": val_docs,
        "shard_tokens": shard_tokens,
        "bos_id": BOS_ID,
        "train_glob": TRAIN_GLOB,
        "val_glob": VAL_GLOB,
        "val_bytes_glob": VAL_BYTES_GLOB,
        "stats": stats,
        "fingerprint": fingerprint,
        "byte_counts": "val bytes = sidecar sums (original UTF-8 bytes; leading/trailing whitespace "
                       "of a doc counts 0); train bytes = UTF-8 bytes of the original docs",
    }
    if transform == "casefold":
        manifest.update(lossy=True, legality=CASEFOLD_LEGALITY,
                        byte_counts="val bytes = sidecar sums of the CASEFOLDED text (lossy transform)")
    manifest.update(extra or {})
    return manifest


# ---------------------------------------------------------------- prepare command

def check_tokenizer_args(args) -> int:
    """The vocab size the run will use; raises on bad tokenizer flags without writing anything."""
    if args.train_tokenizer:
        if not args.vocab_size:
            raise DataError("--train-tokenizer needs --vocab-size N")
        if args.vocab_size > MAX_VOCAB:
            raise DataError(f"--vocab-size {args.vocab_size} > {MAX_VOCAB}: ids must fit in uint16")
        return args.vocab_size  # names use the requested size even if BPE stopped short
    return load_tokenizer(args.tokenizer, args.transform).vocab_size()


def check_train_docs_remain(docs_path: Path, val_docs: int, max_docs) -> None:
    """Refuse a split that leaves no train docs, before anything is written to the output root.

    Otherwise the run would write val shards and a manifest marked complete
    with 0 train docs.  Reads at most val_docs + 1 docs and tokenizes none,
    so it costs seconds, not the minutes of the run itself.
    """
    if max_docs is not None and max_docs <= val_docs:
        raise DataError(f"--max-docs {max_docs} leaves no train documents after --val-docs {val_docs}; "
                        f"pass --max-docs above {val_docs} or a smaller --val-docs")
    n = sum(1 for _ in itertools.islice(iter_docs(docs_path), val_docs + 1))
    if n == 0:
        raise DataError(f"{docs_path}: no documents (the file is empty or holds only blank lines); "
                        "pass a docs file with one document per line")
    if n <= val_docs:
        raise DataError(f"{docs_path} holds only {n} documents, all of them validation documents under "
                        f"--val-docs {val_docs}; pass --val-docs below {n} to leave train documents")


def prepare(args) -> dict:
    root = Path(args.out)
    if args.shard_tokens <= 0 or args.val_docs < 0 or args.workers < 1:
        raise DataError("--shard-tokens and --workers must be positive and --val-docs non-negative")
    if bool(args.tokenizer) == bool(args.train_tokenizer):
        raise DataError("pass exactly one of --tokenizer MODEL or --train-tokenizer --vocab-size N")
    docs_path = Path(args.docs)
    if not docs_path.is_file():
        raise DataError(f"docs file not found: {docs_path}")
    vocab = check_tokenizer_args(args)  # cheap usage errors come before the pass over the docs
    check_train_docs_remain(docs_path, args.val_docs, args.max_docs)
    if args.transform == "casefold":
        print(f"WARNING: {CASEFOLD_LEGALITY}", file=sys.stderr)
    tok_dir = root / "tokenizers"
    if args.train_tokenizer:
        model = train_tokenizer(docs_path, args.transform, args.vocab_size, args.val_docs, args.max_docs,
                                args.tokenizer_train_docs, tok_dir, args.workers, args.overwrite)
    else:
        model = install_tokenizer(args.tokenizer, tok_dir, args.overwrite)
    sp = load_tokenizer(model, args.transform)
    if sp.vocab_size() != vocab:
        print(f"warning: trained vocab has {sp.vocab_size()} pieces, not {vocab}", file=sys.stderr)
    ds_dir = root / "datasets" / dataset_dir_name(args.transform, vocab)
    docs_sha, tok_sha = sha256_file(docs_path), sha256_file(model)
    fingerprint = {"transform": args.transform, "val_docs": args.val_docs, "shard_tokens": args.shard_tokens,
                   "max_docs": args.max_docs, "docs_sha256": docs_sha, "tokenizer_sha256": tok_sha}
    prepare_output_dir(ds_dir, fingerprint, args.overwrite)
    stats = run_pipeline(docs_path, model, args.transform, ds_dir, args.val_docs, args.shard_tokens,
                         args.workers, args.max_docs, args.batch_docs, getattr(args, "total_docs", None))
    manifest = build_manifest(ds_dir, args.transform, model, docs_path, docs_sha, tok_sha, vocab, args.val_docs,
                              args.shard_tokens, stats, fingerprint, getattr(args, "manifest_extra", None))
    write_json(ds_dir / "manifest.json", manifest)
    mb = (stats["val"]["bytes"] + stats["train"]["bytes"]) / 1e6
    ndocs = stats["val"]["docs"] + stats["train"]["docs"]
    print(f"wrote {ds_dir}: val {stats['val']['docs']} docs / {stats['val']['tokens']} tokens / "
          f"{stats['val']['shards']} shards, train {stats['train']['docs']} docs / {stats['train']['tokens']} tokens / "
          f"{stats['train']['shards']} shards; {ndocs / stats['seconds']:.0f} docs/s, "
          f"{mb / stats['seconds']:.2f} MB/s")
    return manifest


# ---------------------------------------------------------------- verify command

def resolve_dataset_dir(root: Path) -> Path:
    root = Path(root)
    if (root / "manifest.json").is_file() and list(root.glob("fineweb_*.bin")):
        return root
    candidates = sorted(p for p in (root / "datasets").glob("*") if p.is_dir()) if (root / "datasets").is_dir() else []
    if len(candidates) != 1:
        raise DataError(f"{root}: expected a dataset dir or an out root with exactly one datasets/<dir> "
                        f"(found {len(candidates)})")
    return candidates[0]


class StripRule:
    """Which leading/trailing chars of a doc SentencePiece leaves without a surface (they are charged 0 bytes).

    Found by experiment with nmt_nfkc + remove_extra_whitespaces: leading chars
    that normalise to whitespace or to nothing are dropped; at the end, a run
    of such chars is dropped from its first whitespace char on, while deleted
    chars (e.g. U+0001) directly after the last kept char stay in its surface.
    Classes come from the model's own normaliser.
    """

    def __init__(self, sp):
        self.sp, self.cache = sp, {}

    def kind(self, c: str) -> str:
        if c not in self.cache:
            norm = self.sp.normalize(f"a{c}b")
            self.cache[c] = "space" if norm == "a\u2581b" else "deleted" if norm == "ab" else "kept"
        return self.cache[c]

    def charged_span(self, text: str):
        """(start, end) of the part of `text` that the piece surfaces cover."""
        i, j = 0, len(text)
        while i < j and self.kind(text[i]) != "kept":
            i += 1
        k = j
        while k > i and self.kind(text[k - 1]) != "kept":
            k -= 1
        while k < j and self.kind(text[k]) == "deleted":
            k += 1
        return i, k

    def charged_bytes(self, text: str) -> int:
        i, k = self.charged_span(text)
        return len(text[i:k].encode("utf-8"))


def verify(root, docs_path, max_report=5) -> int:
    """Re-read val shards and check BOS, sidecars and round trip against the docs; return mismatches."""
    ds_dir = resolve_dataset_dir(root)
    manifest = _read_json(ds_dir / "manifest.json") or {}
    if not manifest.get("complete"):
        raise DataError(f"{ds_dir}/manifest.json is missing or marks an incomplete run")
    transform = manifest["transform"]
    sp = load_tokenizer(ds_dir.parent.parent / "tokenizers" / manifest["tokenizer"]["file"], transform)
    problems = []
    tokens, sidecar = _read_val(ds_dir, problems)
    for path in sorted(ds_dir.glob(TRAIN_GLOB)):
        read_shard(path)  # header and size only
    starts = np.flatnonzero(tokens == BOS_ID)
    expected_docs = manifest.get("stats", {}).get("val", {}).get("docs", len(starts))
    if len(starts) != expected_docs:
        problems.append(f"{len(starts)} BOS tokens in val shards, manifest says {expected_docs} val docs")
    if len(tokens) and (not len(starts) or starts[0] != 0):
        problems.append("val shards do not start with BOS")
    bounds = list(starts) + [len(tokens)]
    strip, transform_fn, checked, normalised = StripRule(sp), TRANSFORMS[transform], 0, 0
    for n, (_, doc) in zip(range(len(starts)), iter_docs(docs_path)):
        a, b = bounds[n] + 1, bounds[n + 1]
        normalised += _check_doc(n, doc, tokens[a:b].tolist(), sidecar[a - 1:b], sp, strip, transform,
                                 transform_fn, problems)
        checked += 1
    if checked < len(starts):
        problems.append(f"docs file has only {checked} docs, val shards hold {len(starts)}")
    print(f"verify: docs={len(starts)} tokens={len(tokens)} bytes={int(sidecar.sum())} mismatches={len(problems)}"
          + (f" (docs changed by SentencePiece normalisation: {normalised})" if transform == "caseops" else ""))
    for p in problems[:max_report]:
        print(f"  {p}")
    return len(problems)


def _read_val(ds_dir: Path, problems: list):
    tokens, sidecar = [], []
    for path in sorted(ds_dir.glob(VAL_GLOB)):
        side_path = path.with_name(path.name.replace("fineweb_val_", "fineweb_val_bytes_"))
        t = read_shard(path)
        s = read_shard(side_path) if side_path.exists() else np.zeros(0, np.uint16)
        if len(s) != len(t):
            problems.append(f"{side_path.name}: {len(s)} entries, token shard has {len(t)}")
            s = np.resize(s, len(t))
        tokens.append(t)
        sidecar.append(s)
    if not tokens:
        raise DataError(f"{ds_dir}: no val shards")
    return np.concatenate(tokens), np.concatenate(sidecar).astype(np.int64)


def _check_doc(n, doc, ids, side, sp, strip, transform, transform_fn, problems) -> int:
    """Check one val doc (side[0] is its BOS entry); return 1 if normalisation changed its text."""
    if side[0] != 0:
        problems.append(f"doc {n}: sidecar {side[0]} at BOS")
    text = transform_fn(doc)
    want = strip.charged_bytes(text if transform != "caseops" else doc)
    if int(side.sum()) != want:
        problems.append(f"doc {n}: sidecar sum {int(side.sum())} != {want} UTF-8 bytes")
    if transform == "caseops":
        escaped = False  # an operator right after an unescaped ESC is literal text (3 bytes)
        for pid, count in zip(ids, side[1:]):
            if 4 <= pid <= 7 and count != (3 if escaped else 0):
                problems.append(f"doc {n}: operator id {pid} has sidecar {count}")
                break
            escaped = pid == 7 and not escaped
    detok = sp.decode(ids)
    if detok != sp.normalize(text).replace("\u2581", " "):
        problems.append(f"doc {n}: tokens do not decode to the normalised transformed doc")
        return 0
    if transform != "caseops":
        return 0
    try:
        restored = lossless_caps.decode(detok)
    except ValueError as e:
        # NFKC can turn a non-ASCII char into an ASCII letter next to an operator ("0.3\u00baC" -> "0.3oC"):
        # the tokens then describe normalised text that CaseOps cannot decode, which is not a byte-count error.
        if unicodedata.normalize("NFKC", text) != text:
            return 1
        problems.append(f"doc {n}: CaseOps decode failed: {e}")
        return 0
    return int(restored != sp.normalize(doc).replace("\u2581", " "))


# ---------------------------------------------------------------- Hugging Face downloads

def hub_caseops_plan(hub_manifest, train_shards=None):
    """(remote path, local path relative to ROOT) for the CaseOps export.

    The repo root `datasets/` holds manifest.json, datasets/<dir>/ and
    tokenizers/, so dropping that prefix gives the local prepare layout.
    Without a manifest, the export's standard names with one val shard are assumed.
    """
    dir_name = dataset_dir_name("caseops", 8192)
    model = tokenizer_file_name("caseops", 8192)
    tokenizer_files, n_val, n_train = [model, model.replace(".model", ".vocab")], 1, None
    if hub_manifest:
        entry = next((d for d in hub_manifest.get("datasets", []) if d.get("name") == dir_name), None)
        if entry is None:
            raise DataError(f"hub manifest has no dataset named {dir_name}")
        n_val = int(entry.get("stats", {}).get("files_val", 1))
        n_train = entry.get("stats", {}).get("files_train")
        tok = next((t for t in hub_manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
        paths = [tok.get("model_path"), tok.get("vocab_path")]
        tokenizer_files = [Path(p).name for p in paths if p] or tokenizer_files
    if train_shards is None:
        if n_train is None:
            raise DataError("--train-shards is required when the hub manifest gives no train shard count")
        train_shards = int(n_train)
    if n_train is not None and train_shards > int(n_train):
        raise DataError(f"the hub export has only {n_train} train shards, {train_shards} requested")
    local = [f"datasets/{dir_name}/{shard_name('val', i)}" for i in range(n_val)]
    local += [f"datasets/{dir_name}/fineweb_val_bytes_{i:06d}.bin" for i in range(n_val)]
    local += [f"datasets/{dir_name}/{shard_name('train', i)}" for i in range(train_shards)]
    local += [f"tokenizers/{name}" for name in tokenizer_files]
    return [(f"{HUB_ROOT}/{path}", path) for path in local]


def hub_docs_plan():
    return [(f"{HUB_ROOT}/docs_selected.source_manifest.json", "docs_selected.source_manifest.json"),
            (f"{HUB_ROOT}/docs_selected.jsonl", "docs_selected.jsonl")]


def hub_fetch(repo_id: str, remote: str, dest: Path, optional=False) -> bool:
    """Download one file atomically into dest (skipped if present); False if optional and absent.

    The staging dir goes away whether the download succeeds, fails or is
    interrupted: a partial file is dropped, finished files stay, so a rerun
    resumes at the first missing file.
    """
    dest = Path(dest)
    if dest.exists():
        return True
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    staging = dest.parent / ".hub_staging"
    try:
        try:
            got = hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", local_dir=staging)
        except Exception as e:
            if optional and type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):  # a 404, not offline
                return False
            raise DataError(f"could not download {remote} from the Hugging Face dataset {repo_id} "
                            f"({type(e).__name__}); check the network connection and access and rerun the same "
                            "command (files already downloaded are kept), or prepare the data locally with --docs"
                            ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_caseops(root: Path, train_shards) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hub_fetch(HUB_CASEOPS_REPO, f"{HUB_ROOT}/manifest.json", root / "hub_manifest.json")
    hub_manifest = _read_json(root / "hub_manifest.json")
    plan = hub_caseops_plan(hub_manifest, train_shards)
    for i, (remote, local) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {remote}", file=sys.stderr, flush=True)
        hub_fetch(HUB_CASEOPS_REPO, remote, root / local)
    ds_dir = root / plan[0][1].rsplit("/", 1)[0]
    model = root / next(local for _, local in plan if local.endswith(".model"))
    write_json(ds_dir / "manifest.json", _hub_local_manifest(ds_dir, model, hub_manifest))
    print(f"downloaded {len(plan)} files into {root}")
    return ds_dir


def _hub_local_manifest(ds_dir: Path, model: Path, hub_manifest) -> dict:
    """A local manifest.json for downloaded shards, so --verify and trainers see one format."""
    val = [read_shard(p) for p in sorted(ds_dir.glob(VAL_GLOB))]
    val_bytes = sum(int(read_shard(p).astype(np.int64).sum()) for p in ds_dir.glob(VAL_BYTES_GLOB))
    val_docs = sum(int((v == BOS_ID).sum()) for v in val)
    train = sorted(ds_dir.glob(TRAIN_GLOB))
    stats = {"val": {"docs": val_docs, "tokens": sum(map(len, val)), "bytes": val_bytes, "shards": len(val)},
             "train": {"shards": len(train), "tokens": sum((p.stat().st_size - HEADER_BYTES) // 2 for p in train)}}
    hub_entry = next((d for d in (hub_manifest or {}).get("datasets", []) if d.get("name") == ds_dir.name), {})
    return {"name": ds_dir.name, "complete": True, "transform": "caseops",
            "text_transform": lossless_caps.TRANSFORM_NAME,
            "tokenizer": {"file": model.name, "sha256": sha256_file(model), "vocab_size": 8192,
                          "path": f"../../tokenizers/{model.name}"},
            "source": {"hub_repo": HUB_CASEOPS_REPO, "hub_manifest": "../../hub_manifest.json"},
            "val_docs": val_docs, "bos_id": BOS_ID, "train_glob": TRAIN_GLOB, "val_glob": VAL_GLOB,
            "val_bytes_glob": VAL_BYTES_GLOB, "stats": stats, "hub_stats": hub_entry.get("stats")}


def download_docs(args) -> None:
    """Fetch docs_selected.jsonl (+ source manifest) and point args at it for a normal prepare."""
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    (src_remote, src_local), (docs_remote, docs_local) = hub_docs_plan()
    meta = _read_json(root / src_local) if hub_fetch(HUB_DOCS_REPO, src_remote, root / src_local, optional=True) else None
    hub_fetch(HUB_DOCS_REPO, docs_remote, root / docs_local)
    args.docs = str(root / docs_local)
    if args.val_docs is None and meta and meta.get("docs_val") is not None:
        args.val_docs = int(meta["docs_val"])
    args.total_docs = (meta or {}).get("num_docs")
    args.manifest_extra = {"source": {"hub_repo": HUB_DOCS_REPO, "source_manifest": meta}}


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--docs", help="docs file: .jsonl[.gz|.xz] with 'text', or plain text (one doc per line)")
    p.add_argument("--out", help="output root (gets datasets/<dir>/ and tokenizers/)")
    p.add_argument("--tokenizer", "--sp", help="existing SentencePiece .model to use (copied into ROOT/tokenizers/); "
                   "--sp is the records' name for it")
    p.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the train docs")
    p.add_argument("--vocab-size", type=int, help="vocab size for --train-tokenizer (<= 65535)")
    p.add_argument("--tokenizer-train-docs", type=int, default=200_000, help="doc limit for tokenizer training")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="caseops")
    p.add_argument("--val-docs", type=int, default=None, help="first N docs are validation (default 50000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-docs", type=int, default=128, help="docs per worker task")
    p.add_argument("--max-docs", type=int, default=None, help="stop after N docs (val + train)")
    p.add_argument("--overwrite", action="store_true", help="replace shards/tokenizers of a different run")
    p.add_argument("--from-hub", choices=("caseops", "docs"), help="download the CaseOps export or the raw docs")
    p.add_argument("--train-shards", type=int, default=None, help="train shards to download (--from-hub caseops)")
    p.add_argument("--verify", metavar="ROOT", help="check a prepared dataset against --docs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            if not args.docs:
                raise DataError("--verify needs --docs FILE")
            return 1 if verify(args.verify, args.docs) else 0
        if not args.out:
            raise DataError("--out ROOT is required")
        if args.from_hub == "caseops":
            download_caseops(args.out, args.train_shards)
            return 0
        if args.from_hub == "docs":
            download_docs(args)
        if not args.docs:
            raise DataError("--docs FILE is required (or --from-hub)")
        if args.val_docs is None:
            args.val_docs = 50_000
        prepare(args)
        return 0
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
