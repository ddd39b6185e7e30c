"""Shared test fixtures: the real FineWeb sample when ../shared/data exists, generated English otherwise."""
import json
import os
import pydoc
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb_sample_200.jsonl"
CASEOPS_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
sys.path.insert(0, str(REPO))


def generated_docs(n=200):
    """Real English without a download: docstrings of installed standard-library modules."""
    import importlib
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if len(docs) >= n:
            break
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod))[:40]]:
            doc = pydoc.getdoc(obj) if obj is not None else ""
            if doc and len(doc) > 200:
                docs.append(doc)
            if len(docs) >= n:
                break
    seen, out = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def load_docs():
    if FINEWEB_SAMPLE.exists():
        with open(FINEWEB_SAMPLE, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return generated_docs()


@pytest.fixture(scope="session")
def docs():
    return load_docs()


@pytest.fixture(scope="session")
def have_shared():
    return FINEWEB_SAMPLE.exists() and CASEOPS_TOKENIZER.exists()
