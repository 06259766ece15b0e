"""Index a corpus in groups with a save after each, as `clara index --save-every` does, and
report the bytes each save wrote and linked.

    python -m clara_benchmarks.store_saves --corpus ../shared/data/corpus/2wiki_6119.json \
        --groups 10 --out docs/benchmarks/store_saves.json

A save hard-links the shards whose rows did not change since the last save, memories and
records alike, so each save should write about one group's bytes whatever the store's size.
The records of every document in one file (the store format before 3) would have been written
whole at every save: the report sets that size, the sum of the record shards, beside what was
written. The memories are random fp16 tensors of the shipped checkpoint's shape (the bytes do
not depend on their values), so that no time goes to compression; the texts are real passages
of ``--corpus``, taken in turn, with the ids and metadata `clara index` gives them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clara_plugins import MemoryStore
from clara_plugins.atomic import write_text_atomically
from clara_plugins.checks import check_output_path, positive_int
from clara_plugins.corpora import document_id, read_documents
from clara_plugins.pretrained import load_model
from clara_plugins.store_folder import SHARD_ROWS

from .measure import environment


def written_and_linked(generation: Path) -> dict[str, int]:
    """Bytes of the generation's memory and record files that this save wrote (one link to the
    file) and that it linked from the generation before (more than one)."""
    sizes = {"memories_written": 0, "memories_linked": 0, "records_written": 0, "records_linked": 0}
    for path in generation.iterdir():
        kind = next((kind for kind in ("memories", "records") if path.name.startswith(kind)), None)
        if kind is not None:
            stat = path.stat()
            sizes[f"{kind}_{'written' if stat.st_nlink == 1 else 'linked'}"] += stat.st_size
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--groups", type=positive_int, default=10, help="saves, one after each group")
    parser.add_argument("--group-size", type=positive_int, default=SHARD_ROWS,
                        help=f"documents a group (default {SHARD_ROWS}, a shard)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    check_output_path(args.out, args.corpus)  # before the saves (the report replaced the corpus named as --out)

    passages = read_documents([str(args.corpus)])  # a wrong file named before the model loads
    if not passages:
        parser.error(f"--corpus {args.corpus} holds no passages")
    model = load_model(device="cpu")
    shape = (args.group_size, model.config.n_mem_tokens, model.hidden_size)
    scratch = tempfile.TemporaryDirectory(prefix="clara-saves-")  # this run's own, removed at the end
    store, saves = MemoryStore(model), []
    generator = torch.Generator().manual_seed(0)
    for group in tqdm(range(args.groups), desc="groups"):
        positions = range(group * args.group_size, (group + 1) * args.group_size)
        texts = [f"{passages[i % len(passages)]} ({i})" for i in positions]  # distinct, as a corpus's passages
        store.upsert(texts, ids=[document_id(text) for text in texts],
                     metadatas=[{"source": args.corpus.name, "position": i} for i in positions],
                     memories=torch.randn(shape, generator=generator).to(torch.float16))
        started = time.perf_counter()
        generation = store.save(scratch.name)
        seconds = time.perf_counter() - started
        records_in_one_file = sum(p.stat().st_size for p in generation.glob("records-*.json"))
        saves.append({"documents": len(store), "seconds": round(seconds, 2), **written_and_linked(generation),
                      "records_in_one_file": records_in_one_file})
        print(json.dumps(saves[-1]), flush=True)
    scratch.cleanup()
    totals = {key: sum(save[key] for save in saves) for key in saves[0] if key not in ("documents", "seconds")}
    report = {"groups": args.groups, "group_size": args.group_size, "corpus": str(args.corpus), "saves": saves,
              "totals": totals, **environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
