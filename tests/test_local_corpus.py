"""local_corpus.py: your own corpus (prepare.py --source): file formats, folders and source trees with their skip
rules, the deterministic train/validation split, one cache per corpus, and bad input. Offline."""
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_cache
import local_corpus
from conftest import ROOT, cache_files, copy_cache, run_prepare, sample_docs, shard_texts


def make_source_tree(root):
    """A small source tree with one file of every kind the import must take or skip. Returns the documents
    it should yield, in order."""
    files = {
        "README": "A project.\n",
        "src/main.c": "int main(void) { return 0; }\n",
        "src/util.py": "def f():\n    return 1\n",
        "src-extra.h": "#define X 1\n",           # '-' sorts before '/': after README, before src/
        "docs/guide.txt": "First paragraph.\n\nSecond paragraph.\n",
        "data/notes.jsonl": json.dumps({"text": "a json document"}) + "\n",
        "empty.md": "  \n",
        # skipped
        "logo.png": "\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        "latin1.c": None,
        "big.h": "x" * (local_corpus.MAX_FILE_BYTES + 1),
        ".git/config": "[core]\n",
        "node_modules/pkg/index.js": "module.exports = 1\n",
        "src/__pycache__/util.cpython-311.pyc": "cached",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.write_bytes("caf\xe9 = 1;\n".encode("latin-1"))
        else:
            path.write_text(text, encoding="utf-8")
    (root / "link.c").symlink_to(root / "src" / "main.c")
    (root / "linked_dir").symlink_to(root / "src", target_is_directory=True)
    expected = ["A project.\n", "a json document", "First paragraph.", "Second paragraph.",
                "#define X 1\n", "int main(void) { return 0; }\n", "def f():\n    return 1\n"]
    return expected

# --- folders of text files -----------------------------------------------------------------


def test_source_tree_documents_in_sorted_order_and_skip_rules(tmp_path):
    expected = make_source_tree(tmp_path / "tree")
    skipped = {}
    assert list(local_corpus.read_documents(str(tmp_path / "tree"), skipped)) == expected
    assert {reason: sorted(paths) for reason, paths in skipped.items()} == {
        "binary (NUL bytes)": ["logo.png"],
        "not UTF-8": ["latin1.c"],
        f"over {local_corpus.MAX_FILE_BYTES // 1024} KB": ["big.h"],
        "symlinks": ["link.c", "linked_dir"],
        "VCS/tooling folders": [".git/", "node_modules/", os.path.join("src", "__pycache__") + "/"],
    }


def test_source_tree_through_the_command_line_names_what_it_skipped(tmp_path):
    tree = tmp_path / "tree"
    make_source_tree(tree)
    for i, doc in enumerate(sample_docs()):  # enough text for the tokenizer: one sample document per file
        (tree / "books" / f"{i:04d}.md").parent.mkdir(exist_ok=True)
        (tree / "books" / f"{i:04d}.md").write_text(doc, encoding="utf-8")
    cache = tmp_path / "cache"
    result = run_prepare("--source", str(tree), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Skipped 8 files or folders:" in out
    for line in ["  1 binary (NUL bytes): logo.png", "  1 not UTF-8: latin1.c", "  2 symlinks: link.c, linked_dir",
                 f"  1 over {local_corpus.MAX_FILE_BYTES // 1024} KB: big.h"]:
        assert line in out.splitlines(), out
    docs = shard_texts(cache / "data" / data_cache.VAL_FILENAME)
    docs += [t for p in sorted((cache / "data").glob("shard_0000*.parquet")) for t in shard_texts(p)]
    assert len(docs) == 7 + len(sample_docs())
    for skipped_text in ["IHDR", "x" * 1000, "[core]", "module.exports", "cached"]:
        assert not any(skipped_text in d for d in docs)


def test_folder_without_any_text_file(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.bin").write_bytes(b"\0\1\2")
    result = run_prepare("--source", str(tmp_path / "tree"), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "0 non-empty document(s) (skipped 1 binary (NUL bytes))" in result.stderr

# --- files, the train/validation split, one corpus per cache ------------------------------


def test_local_formats_and_folder(tmp_path):
    docs = sample_docs(300)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(docs[:100]).replace("\n\n\n", "\n \n"), encoding="utf-8")
    with open(folder / "b.jsonl", "w") as f:
        for d in docs[100:200]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[200:]}), folder / "sub" / "c.parquet")
    n_txt = len(list(local_corpus.read_documents(str(folder / "a.txt"))))
    all_docs = list(local_corpus.read_documents(str(folder)))
    n_all = len(all_docs)
    assert n_all == n_txt + 200
    cache = tmp_path / "cache"
    result = run_prepare("--source", str(folder), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    shards = sorted(glob.glob(str(cache / "data" / "shard_*.parquet")))
    assert os.path.basename(shards[-1]) == data_cache.VAL_FILENAME
    val = shard_texts(shards[-1])
    train = [t for s in shards[:-1] for t in shard_texts(s)]
    assert len(val) + len(train) == n_all
    assert val == all_docs[::local_corpus.LOCAL_VAL_EVERY]  # held out: every 10th document, in order
    # deterministic: the same corpus gives the same split
    again = tmp_path / "again"
    assert run_prepare("--source", str(folder), "--cache-dir", str(again)).returncode == 0
    assert shard_texts(again / "data" / data_cache.VAL_FILENAME) == val


def test_shared_corpus_and_cache_env(tmp_path):
    shared = os.path.join(ROOT, "..", "shared", "data", "shakespeare.jsonl")
    if not os.path.exists(shared):
        pytest.skip("no ../shared corpus beside this checkout")
    result = run_prepare("--source", shared, env={"AUTORESEARCH_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "tokenizer" / "tokenizer.tiktoken")


def test_refuses_to_mix_corpora_unless_forced(tmp_path, prepared_cache):
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs()[::-1]))
    cache = tmp_path / "cache"
    assert run_prepare("--source", "sample", "--cache-dir", str(cache)).returncode == 0
    result = run_prepare("--source", str(one), "--cache-dir", str(cache))
    assert result.returncode == 1 and "--force" in result.stderr
    assert run_prepare("--source", str(one), "--cache-dir", str(cache), "--force").returncode == 0


@pytest.mark.parametrize("name,content,message", [
    ("tiny.txt", b"one short document", "too small"),
    ("latin1.txt", "caf\xe9 au lait\n\nmore text".encode("latin-1"), "not UTF-8"),
    ("missing.jsonl", None, "not found"),
])
def test_a_failed_force_leaves_the_old_corpus_in_place(tmp_path, prepared_cache, name, content, message):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    before = cache_files(cache)
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = run_prepare("--source", str(path), "--cache-dir", str(cache), "--force")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert cache_files(cache) == before
    again = run_prepare("--cache-dir", str(cache))  # and the old corpus is still ready to train on
    assert again.returncode == 0 and "Tokens: up to date" in again.stdout, again.stderr

# --- bad input: a clear error, a non-zero exit, nothing half-written --------------------


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "too small"),
    ("blank.jsonl", b"\n\n", "too small"),
    ("latin1.txt", "caf\xe9 au lait\n\nmore text".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "bad.jsonl:2"),
    ("notext.jsonl", b'{"body": "x"}\n', "\"text\""),
    ("corpus.csv", b"a,b\n", "unsupported"),
])
def test_bad_corpus(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    cache = tmp_path / "cache"
    result = run_prepare("--source", str(path), "--cache-dir", str(cache))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not glob.glob(str(cache / "data" / "*.parquet*"))
    assert not glob.glob(str(cache / "tokenizer" / "*"))


def test_a_corpus_too_small_for_the_tokenizer_says_how_to_replace_it(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"a short note number {i}, far too little text for 8192 tokens.\n")
    cache = tmp_path / "cache"
    small = run_prepare("--source", str(folder), "--cache-dir", str(cache))
    assert small.returncode == 1 and "too small" in small.stderr and "--force" in small.stderr, small.stderr
    # following the message works: a bigger corpus replaces it in the same cache
    bigger = run_prepare("--source", "sample", "--cache-dir", str(cache), "--force")
    assert bigger.returncode == 0, bigger.stderr
