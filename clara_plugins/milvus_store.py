"""MilvusMemoryStore: the memory store kept in a Milvus collection, from one folder to a cluster.

``uri`` is what ``pymilvus.MilvusClient`` takes: a local path ending in ``.db`` (a folder)
runs milvus-lite inside this process (tests, one machine; it serves the folder on a loopback
port without a password: any user of this machine can read and change it while the store is
open), an ``http(s)://`` address reaches a
Milvus server or cluster; the code is the same. The data live in Milvus, so reopening the
same uri and collection with the same model finds the same documents.

One row per document:

- ``id`` (primary key), ``text`` and ``metadata`` (JSON);
- ``key``: CLaRa's unit-norm retrieval key (``ClaraConfig.retrieval_key``), searched by inner
  product (a cosine, as in the local store);
- ``memory``: the unit-norm flattened fp16 memory, and ``norm``, its length before
  normalising. ``memory * norm`` rounded to fp16 gives back the stored memory bit for bit
  (float32 keeps seven digits, fp16 needs four). With flattened retrieval keys the key *is*
  this vector, and the collection has no ``memory`` field: the memory is kept once;
- ``prefix``: the first MIN_FOUND_CHARS characters of the text as a prompt holds it (trimmed,
  ``found.found_prefix``), so that ``documents_in`` asks Milvus for the few texts that can start
  at some position of a prompt. Collections written by earlier versions hold the untrimmed
  start: there a document stored with leading whitespace is found only untrimmed.

The collection records the compressor's and the keys' signatures in a property and refuses a
model with other ones. Metadata filters take the local store's language (``clara_plugins.filters``),
translated into a Milvus expression in which every value is an escaped literal. Milvus judges
them, and where its JSON comparisons differ from the local store's, its judgement stands:
milvus-lite compares in Python, so a range bound also matches a boolean as 0 or 1; a Milvus
server tells booleans from numbers in equality (``True`` is not ``1``), and reads metadata keys
holding a quote or a backslash as written, escapes included.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
try:
    from pymilvus import DataType, MilvusClient, MilvusException
    from pymilvus.milvus_client import IndexParams
except ModuleNotFoundError as error:
    if error.name != "pymilvus":  # installed, and broken inside: its own error says more
        raise
    raise ImportError('MilvusMemoryStore needs pymilvus: pip install "clara-plugins[milvus]"') from error

from .base_store import (CALIBRATION_SAMPLE, FETCH_K, BaseMemoryStore, StoredDocument, calibration_rows, check_known,
                         check_search, id_list, last_of_each, pair_cosines, query_vector)
from .checkpoint import RECOMPRESS, check_compressor, compressor_signature
from .checks import check_positive_int, check_texts, unicode_problem
from .errors import InvalidInputError, StoreError
from .filters import Filter, validate_filter
from .found import MIN_FOUND_CHARS, TextLookup, found_prefix
from .keys import maximal_marginal_relevance, memory_keys
from .model import ClaraModel

FORMAT = "clara-milvus-store/1"
HEADER_PROPERTY = "clara.store"  # the collection property holding FORMAT and the compressor signature
MAX_DIMENSIONS = 32_768  # Milvus' largest vector
MAX_TOP_K = 16_384  # Milvus' largest search limit
MAX_ID_BYTES = 512
MAX_TEXT_BYTES = 65_535  # Milvus' longest VARCHAR
MAX_METADATA_BYTES = 65_536  # Milvus' largest JSON value
BATCH_ROWS = 256  # rows per request: about 10 MB of keys at CR16, well under gRPC's message limit
CALIBRATION_IDS = 16 * CALIBRATION_SAMPLE  # ids in id order the relevance sample is spread over
CREATION_WAIT_SECONDS = 10.0  # how long a client whose creation failed waits for another's to appear
_NOTHING = 'id == ""'  # an expression no row satisfies: ids are never empty
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_COMPARISONS = {"$eq": "==", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


class MilvusMemoryStore(BaseMemoryStore):
    """Upsert, delete, get and search documents compressed by one ClaraModel, kept in Milvus.

    ``MilvusMemoryStore(model, "stores/clara.db")`` keeps them in a milvus-lite folder,
    ``MilvusMemoryStore(model, "http://host:19530", token="user:password")`` on a server.
    It behaves as ``MemoryStore`` (same methods, ids, filters, scores and errors) with
    CLaRa's own keys, except that:

    - ``index_type`` is Milvus' (``FLAT``, the default, is exact; ``HNSW`` or ``IVF_FLAT`` suit
      large collections), built with ``index_params`` (``{"M": 16, "efConstruction": 200}``,
      ``{"nlist": 1024}``) when the collection is created (and for the indexes a creation killed
      midway left out), and searched with the ``search_params`` attribute (``{"ef": 128}``,
      ``{"nprobe": 16}``): Milvus' defaults otherwise, which bound the recall of a large collection.
      An existing collection keeps its own: without ``index_type`` it is opened as it was built,
      with another it is refused;
    - a search returns at most MAX_TOP_K documents;
    - ``get_where`` chooses and reads in one hold of this client's lock: another client's write
      between the two may return a document the filter no longer selects;
    - Milvus does not tell a JSON null from a missing field: a filter never compares with
      null, and ``$ne``/``$nin`` do not match a field that holds null;
    - filters compare with strings, numbers (integers within int64) and booleans only (a list
      or dict value is refused), on metadata keys that are not empty and hold no ``][``;
    - documents of equal score come in Milvus' order (a replaced document is a new row), not
      in the order they were first stored;
    - ``all_ids`` and ``ids_where`` list ids in id order (pages follow an id cursor), not in
      the order they were stored: a LlamaIndex ``get_nodes`` too;
    - ids hold at most MAX_ID_BYTES bytes of UTF-8, texts MAX_TEXT_BYTES, metadata
      MAX_METADATA_BYTES of JSON;
    - an upsert of more than BATCH_ROWS documents is written in batches, so a failure midway
      (a lost connection) can leave the first batches stored;
    - ``relevance`` calibrates on CALIBRATION_SAMPLE documents spread evenly over the first
      CALIBRATION_IDS in id order (the whole of a smaller store; a random sample for uuid or
      SHA-256 ids), recomputed after this object's own changes.
    """

    def __init__(
        self,
        model: ClaraModel,
        uri: str | os.PathLike,
        collection: str = "clara_memories",
        *,
        token: str = "",
        index_type: str | None = None,
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        batch_size: int = 8,
    ) -> None:
        for name, params in (("index_params", index_params), ("search_params", search_params)):
            if params is not None and not isinstance(params, dict):
                raise InvalidInputError(f"{name} must be a dict of Milvus' settings, got {type(params).__name__}")
        if not isinstance(collection, str) or not _COLLECTION_NAME.fullmatch(collection):  # "$" let "x\n" by
            raise InvalidInputError(f"collection must be letters, digits and underscores, not starting with a "
                                    f"digit, got {collection!r:.80}")
        super().__init__(model, None, batch_size)
        uri = os.fspath(uri)  # a Path to a .db folder too
        self.collection = collection
        self._index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self._memory_shape = (model.config.n_mem_tokens, model.hidden_size)
        self._dimensions = math.prod(self._memory_shape)
        self._memory_field = "key" if self.keys.kind == "flat" else "memory"
        if self._dimensions > MAX_DIMENSIONS:
            raise StoreError(f"this model's memories have {self._dimensions:,} values, more than Milvus' "
                             f"{MAX_DIMENSIONS:,}: use a higher compression rate or the local MemoryStore")
        if uri.endswith(".db"):  # milvus-lite
            if problem := lite_index_problem(index_type or "FLAT"):
                raise InvalidInputError(problem)
            uri = os.path.expanduser(uri)  # "~/stores/clara.db" made a folder named "~" where the process ran
            if os.path.isfile(uri):  # refused as if another process had it open
                raise StoreError(f"{uri} is a file: milvus-lite 3 keeps a store in a folder of that name, and "
                                 "cannot open a milvus-lite 2 file")
            Path(uri).parent.mkdir(parents=True, exist_ok=True)  # it opens a store only in an existing folder
        try:
            self._client = MilvusClient(uri, token=token)
        except MilvusException as error:  # milvus-lite logs its cause (another process's lock, mostly) and says this
            if uri.endswith(".db") and error.message == "Open local milvus failed":
                raise StoreError(f"milvus-lite could not open {uri}: most often another process has it open (it "
                                 "serves a folder to one process, until that process exits); the log above names "
                                 "the cause") from error
            raise
        try:
            self._open(collection, index_type, f"Milvus collection {collection!r} at {uri}")
        except BaseException:
            self._client.close()
            raise

    def _open(self, collection: str, index_type: str | None, described: str) -> None:
        """Check, index and load the collection, created first where it is missing. Another client
        may create it at the same moment: this one then opens theirs (it dropped it, found empty,
        and both failed)."""
        created = False
        if not self._client.has_collection(collection):
            try:
                self._create_collection()
                created = True
            except MilvusException as error:
                if not self._appears(collection, waited="exist" in str(error)):
                    raise
        try:
            self._check_header(described)
            self._index_bare_fields(index_type or "FLAT")
            self._check_index(index_type, described)
            self._client.load_collection(collection)
        except Exception:  # a collection without its index would pass the header check, then never load
            if created:
                self._drop_if_empty()
            raise

    def _appears(self, collection: str, waited: bool) -> bool:
        """Whether another client's collection appears, after this one's creation failed: milvus-lite
        refuses a second creation ("File exists") before it lists the first one's collection, so
        such a refusal is ``waited`` for; any other failure is checked once, its error said at once."""
        deadline = time.monotonic() + (CREATION_WAIT_SECONDS if waited else 0.0)
        while not self._client.has_collection(collection):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _drop_if_empty(self) -> None:
        """Drop the collection whose creation failed here, unless it holds rows: another process
        may have filled it meanwhile."""
        try:
            if (self._client.has_collection(self.collection)
                    and int(self._client.get_collection_stats(self.collection)["row_count"]) == 0):
                self._client.drop_collection(self.collection)
        except MilvusException:
            pass  # the creation's own error is the one to report

    def _create_collection(self) -> None:
        """The collection, its schema and header, without indexes (``_index_bare_fields``)."""
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("key", DataType.FLOAT_VECTOR, dim=self.keys.dimensions)
        if self._memory_field == "memory":
            schema.add_field("memory", DataType.FLOAT_VECTOR, dim=self._dimensions)
        schema.add_field("norm", DataType.FLOAT)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("prefix", DataType.VARCHAR, max_length=4 * MIN_FOUND_CHARS)  # 4 bytes per character at most
        schema.add_field("metadata", DataType.JSON)
        header = {"format": FORMAT, "compressor": compressor_signature(self.model), "keys": self.keys.signature()}
        # Strong consistency: a read sees every write made before it
        self._client.create_collection(self.collection, schema=schema, consistency_level="Strong",
                                       properties={HEADER_PROPERTY: json.dumps(header)})

    def _indexes(self, index_type: str) -> IndexParams:
        indexes = self._client.prepare_index_params()
        indexes.add_index(field_name="key", index_type=index_type, metric_type="IP", params=self._index_params)
        if self._memory_field == "memory":  # never searched, but Milvus indexes every vector field
            indexes.add_index(field_name="memory", index_type="FLAT", metric_type="IP")
        for field in ("text", "prefix"):  # what ids_for_texts and documents_in look up
            indexes.add_index(field_name=field, index_type="INVERTED")
        return indexes

    def _index_bare_fields(self, index_type: str) -> None:
        """Index the fields of a new collection, or of one whose creation was killed before all its
        indexes were made: Milvus loads no collection with a vector field unindexed. Another client
        creating the collection at this moment may index a field first."""
        for index in self._indexes(index_type):
            if self._client.list_indexes(self.collection, field_name=index.field_name):
                continue
            try:
                self._client.create_index(self.collection, IndexParams([index]))
            except MilvusException:
                if not self._client.list_indexes(self.collection, field_name=index.field_name):
                    raise

    def _check_index(self, index_type: str | None, described: str) -> None:
        """Refuse an index type the collection's keys were not built with: it was searched with its
        own, unsaid (an exact FLAT asked for, an approximate HNSW searched, and the reverse)."""
        built = {str(self._client.describe_index(self.collection, name).get("index_type"))
                 for name in self._client.list_indexes(self.collection, field_name="key")}
        if index_type is not None and built and index_type not in built:
            raise StoreError(f"{described} was indexed with {', '.join(sorted(built))}, not {index_type}: open it "
                             "without index_type (or with its own), or name another collection")

    def _check_header(self, described: str) -> None:
        """Refuse a collection that this class did not create, or that another compressor filled."""
        properties = self._client.describe_collection(self.collection).get("properties", {})
        if HEADER_PROPERTY not in properties:
            raise StoreError(f"{described} exists but is not a CLaRa memory store (it has no {HEADER_PROPERTY!r} "
                             "property): choose another collection name")
        try:
            header = json.loads(properties[HEADER_PROPERTY])
        except json.JSONDecodeError as error:
            raise StoreError(f"{described}: its {HEADER_PROPERTY!r} property is not JSON ({error})") from error
        if not isinstance(header, dict) or header.get("format") != FORMAT or "compressor" not in header:
            raise StoreError(f"{described}: its {HEADER_PROPERTY!r} property is not a header of format {FORMAT!r}")
        check_compressor(header["compressor"], compressor_signature(self.model), described,
                         remedy=f"{RECOMPRESS} into a new collection")
        keys = header.get("keys", {"kind": "clara-memories"})  # collections made before the mean key: flattened
        if keys != self.keys.signature():
            raise StoreError(f"{described} was indexed with keys {keys}, not {self.keys.signature()}: "
                             "load a model with the same retrieval_key")

    def close(self) -> None:
        """Release the connection; the data stay in Milvus. milvus-lite keeps a ``.db`` folder's
        server, shared by every client of the process, until the process exits: a folder deleted
        meanwhile is still served to the next store opened on its path."""
        self._client.close()

    def __len__(self) -> int:
        return int(self._client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    # -------------------------------------------------------------- writing

    def _checked(
        self, texts: Sequence[str], ids: Sequence[str] | None, metadatas: Sequence[dict[str, Any]] | None,
    ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """The local store's checks and Milvus' limits on ids and texts, so that ``index_documents``
        refuses a corpus before its first group is written, not midway."""
        texts, ids, metadatas = super()._checked(texts, ids, metadatas)
        for doc_id, text in zip(ids, texts):
            if len(doc_id.encode()) > MAX_ID_BYTES:
                raise InvalidInputError(f"document id {doc_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes")
            if len(text.encode()) > MAX_TEXT_BYTES:
                raise InvalidInputError(f"the text of {doc_id!r} is longer than Milvus' {MAX_TEXT_BYTES:,} bytes")
        for doc_id, metadata in zip(ids, metadatas):
            if len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
                raise InvalidInputError(f"the metadata of {doc_id!r} is more than Milvus' {MAX_METADATA_BYTES:,} "
                                        "bytes of JSON")
            huge = _huge_integer(metadata)
            if huge is not None:  # pymilvus' JSON encoder fails on it, after earlier batches were written
                raise InvalidInputError(f"the metadata of {doc_id!r} holds the integer {huge}, beyond the 64 bits "
                                        "Milvus' JSON keeps: store it as a string")
        return texts, ids, metadatas

    def upsert(self, texts: Sequence[str], ids: Sequence[str] | None = None,
               metadatas: Sequence[dict[str, Any]] | None = None, show_progress: bool = False,
               memories: torch.Tensor | None = None) -> list[str]:
        """Compress and add documents, as ``MemoryStore.upsert`` does; everything is validated
        and compressed before the first row is written."""
        texts, ids, metadatas = self._checked(texts, ids, metadatas)
        memories = self._compressed(texts, memories, show_progress)
        kept = last_of_each(ids)
        with self._lock:
            try:
                for start in range(0, len(kept), BATCH_ROWS):
                    part = kept[start:start + BATCH_ROWS]
                    self._client.upsert(self.collection, self._rows(memories[part], [texts[i] for i in part],
                                                                    [ids[i] for i in part], [metadatas[i] for i in part]))
            finally:  # the first batches may be in, even when a later one failed
                self._changed()
        return ids

    def _rows(self, memories: np.ndarray, texts: list[str], ids: list[str], metadatas: list[dict]) -> list[dict]:
        """The collection's rows of fp16 memories [n, n_mem, hidden], made a request at a time
        (their float32 keys and norms for a whole corpus at once came to about 90 KB a passage)."""
        norms = np.linalg.norm(memories.reshape(len(memories), -1).astype(np.float32), axis=1)
        keys = self.keys.memory_keys(memories)
        flat = keys if self._memory_field == "key" else memory_keys(memories, "flat")  # the memory, unit-norm
        return [{"id": doc_id, "key": key, self._memory_field: memory, "norm": float(norm), "text": text,
                 "prefix": found_prefix(text), "metadata": metadata}
                for doc_id, key, memory, norm, text, metadata in zip(ids, keys, flat, norms, texts, metadatas)]

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; ids that are not stored are ignored (quoted here: the client's
        ids= quotes none of them)."""
        self.delete_where(None, ids)

    def delete_where(self, where: Filter | None = None, ids: Collection[str] | None = None) -> None:
        """As ``BaseMemoryStore.delete_where``, in deletes on the server that choose their rows
        themselves, which no other client's write can come between (the lock holds for this
        object alone): one, or one a batch of ``ids``."""
        condition = None if where is None else milvus_filter(where)
        if ids is None:
            expressions = [condition or 'id >= ""']  # every id: none is below ""
        else:
            expressions = _among(id_list(ids, "ids", ordered=False), condition)
        with self._lock:
            try:
                for expression in expressions:
                    self._client.delete(self.collection, filter=expression)
            finally:
                self._changed()

    # -------------------------------------------------------------- reading

    def stored_ids(self, ids: Sequence[str]) -> set[str]:
        return {row["id"] for row in self._rows_where("id", list(dict.fromkeys(id_list(ids, "ids"))), ["id"])}

    def get(self, ids: Sequence[str]) -> list[StoredDocument]:
        """Documents in the order asked; ids that are not stored are skipped."""
        ids = id_list(ids, "ids")
        rows = self._rows_where("id", ids, ["text", "metadata"])
        found = {row["id"]: row for row in rows}
        return [StoredDocument(i, found[i]["text"], found[i]["metadata"]) for i in ids if i in found]

    def memories(self, ids: Sequence[str]) -> torch.Tensor:
        """Memory tokens [len(ids), n_mem, hidden] (float32) for the generator: memory * norm, in fp16."""
        ids = id_list(ids, "ids")
        found = {row["id"]: row for row in self._rows_where("id", ids, [self._memory_field, "norm"])}
        check_known(ids, found)
        return self._memories_of([found[i] for i in ids])

    def _texts_and_memories(self, ids: list[str]) -> dict[str, tuple[str, torch.Tensor]]:
        """Each stored id's text and memory tokens from one query: other clients write to the
        collection too, and this object's lock does not hold them."""
        rows = self._rows_where("id", ids, ["text", self._memory_field, "norm"]) if ids else []
        return {row["id"]: (row["text"], memory) for row, memory in zip(rows, self._memories_of(rows))} if rows else {}

    def _memories_of(self, rows: list[dict]) -> torch.Tensor:
        """[len(rows), n_mem, hidden] float32: memory * norm, rounded to fp16 as stored."""
        vectors = np.array([row[self._memory_field] for row in rows], dtype=np.float32)
        norms = np.array([row["norm"] for row in rows], dtype=np.float32)
        memories = (vectors * norms[:, None]).astype(np.float16).reshape(len(rows), *self._memory_shape)
        return torch.from_numpy(memories.astype(np.float32))

    def ids_where(self, where: Filter, among: Collection[str] | None = None) -> list[str]:
        """Ids of the documents whose metadata satisfies a filter, of every stored one or of
        those ``among`` these ids (in their order): asked of the server a batch of ids at a time."""
        condition = milvus_filter(where)
        if among is None:
            return self._ids_matching(condition or "")
        among = id_list(among, "among", ordered=False)
        chosen = {doc_id for expression in _among(among, condition) for doc_id in self._ids_matching(expression)}
        return [doc_id for doc_id in among if doc_id in chosen]

    def ids_for_texts(self, texts: Sequence[str]) -> list[str | None]:
        """The stored id of each exact text, or None: lets a generator reuse stored memories."""
        texts = check_texts(texts, "texts", blanks=True)  # as the local store: a None, or bad Unicode, named
        ids_by_text = {row["text"]: row["id"] for row in self._rows_where("text", texts, ["text"])}
        return [ids_by_text.get(text) for text in texts]

    def documents_in(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text`` as a prompt
        holds it (``found_text``), in order and without overlaps (the longest document wins at a
        position).

        Milvus is asked for the stored texts that begin like some MIN_FOUND_CHARS characters of
        ``text``; shorter documents are not looked for.
        """
        windows = sorted({text[start:start + MIN_FOUND_CHARS] for start in range(len(text) - MIN_FOUND_CHARS + 1)})
        rows = self._rows_where("prefix", windows, ["text"])
        return TextLookup((row["id"], row["text"]) for row in rows).find(text)

    def all_ids(self) -> list[str]:
        return self._ids_matching("")

    def _rows_where(self, field: str, values: list[str], output_fields: list[str]) -> list[dict]:
        """The rows whose ``field`` is one of ``values`` (with their ids), in batches."""
        rows = []
        for start in range(0, len(values), BATCH_ROWS):
            rows += self._client.query(self.collection, filter=_one_of(field, values[start:start + BATCH_ROWS]),
                                       output_fields=output_fields)
        return rows

    def _ids_matching(self, expression: str) -> list[str]:
        """Every id satisfying an expression ("" for all), read a page at a time in id order,
        each page after the last id read, until one comes back empty. The cursor is quoted here:
        pymilvus' query_iterator wrote it into its next filter unescaped, so an id holding a
        quote or a backslash at a page's end failed the read, or read ids twice."""
        ids: list[str] = []
        while True:
            parts = ([f"id > {_string(ids[-1])}"] if ids else []) + ([expression] if expression else [])
            # as the iterator asks: each segment's rows in id order, so a page holds the smallest ids left
            page = self._client.query(self.collection, filter=_all(parts) if parts else "", output_fields=["id"],
                                      limit=4 * BATCH_ROWS, iterator="True")
            if not page:
                return ids
            ids += [row["id"] for row in page]

    # ------------------------------------------------------------- searching

    def search_by_key(
        self, key: ArrayLike | torch.Tensor, k: int = 4, where: Filter | None = None, *,
        ids: Collection[str] | None = None,
        lambda_mult: float = 1.0, fetch_k: int = FETCH_K,
    ) -> list[tuple[StoredDocument, float]]:
        """Like ``search`` for a query key computed elsewhere."""
        k, fetch_k = check_search(k, where, lambda_mult, fetch_k)
        query = query_vector(key, self.keys.dimensions)
        conditions = [] if ids is None else [_one_of("id", id_list(ids, "ids", ordered=False))]
        if where is not None and (expression := milvus_filter(where)) is not None:
            conditions.append(expression)
        diverse = lambda_mult < 1.0
        limit = min(max(k, fetch_k) if diverse else k, MAX_TOP_K)
        hits = self._client.search(
            self.collection, data=[query.tolist()], anns_field="key",  # the memory field is never searched
            limit=limit,
            filter=_all(conditions) if conditions else "",
            search_params={"metric_type": "IP", "params": self._search_params(limit)},
            output_fields=["text", "metadata", "key"] if diverse else ["text", "metadata"])[0]
        if diverse and hits:
            keys = np.array([hit["entity"]["key"] for hit in hits], dtype=np.float32)
            hits = [hits[i] for i in maximal_marginal_relevance(query, keys, k, lambda_mult)]
        return [(StoredDocument(hit["id"], hit["entity"]["text"], hit["entity"]["metadata"]), float(hit["distance"]))
                for hit in hits[:k]]

    def _search_params(self, limit: int) -> dict[str, Any]:
        """The search settings, an HNSW breadth ``ef`` at least the documents asked for (a server
        refuses a smaller one), as the local store widens its own."""
        params = dict(self.search_params)
        if "ef" in params:
            check_positive_int("search_params['ef']", params["ef"])
            params["ef"] = max(params["ef"], limit)
        return params

    def _sample_pair_cosines(self) -> np.ndarray:
        """Sorted cosines between distinct documents of an evenly spread sample of the first
        CALIBRATION_IDS ids, in id order (a query's first rows came in storage order: one
        source's, indexed source by source); one query, not a listing of every id after each write."""
        rows = self._client.query(self.collection, filter="", output_fields=["id"], limit=CALIBRATION_IDS,
                                  iterator="True")  # as _ids_matching asks: the smallest ids
        ids = sorted(row["id"] for row in rows)
        if len(ids) < 2:
            return np.zeros(0, dtype=np.float32)
        rows = self._rows_where("id", [ids[row] for row in calibration_rows(len(ids))], ["key"])
        return pair_cosines(np.array([row["key"] for row in rows], dtype=np.float32))


def lite_index_problem(index_type: str) -> str | None:
    """Why milvus-lite builds no ``index_type`` index over the memories, or None. It accepted
    any name, logged the build's failure in the background and searched every row, so a store
    or benchmark named one index and measured another."""
    try:
        from milvus_lite.index.factory import KNOWN_VECTOR_INDEX_TYPES
    except ImportError:  # a milvus-lite that lists them elsewhere, or none installed: unchecked
        return None
    known = sorted(KNOWN_VECTOR_INDEX_TYPES - {"SPARSE_INVERTED_INDEX"})  # the key is a dense vector
    if index_type in known:
        return None
    return f"milvus-lite builds no {index_type!r} index (it would search every row); use one of {', '.join(known)}"


# ------------------------------------------------------------------ filters

def milvus_filter(where: Filter) -> str | None:
    """The Milvus expression keeping the documents ``filters.matcher`` keeps; None keeps all.

    Metadata live in the JSON field ``metadata``. ``$in`` and ``$nin`` become chains of
    ``==`` (milvus-lite compares JSON values with ``==`` only), and ``$ne``/``$nin`` also ask
    that the field exists, as the local store does.
    """
    validate_filter(where)
    return _expression(where)


def _expression(where: Filter) -> str | None:
    parts = []
    for key, condition in where.items():
        if key == "$and":
            parts += [part for part in map(_expression, condition) if part is not None]
        elif key == "$or":
            either = [_expression(part) for part in condition]
            if None not in either:  # an empty part keeps everything, and so does the $or
                parts.append(_any(either))
        elif isinstance(condition, dict):
            field = _field(key)
            # {"field": {}} asks only that the field exists
            parts += [_condition(field, key, name, target) for name, target in condition.items()] or [f"exists {field}"]
        else:
            parts.append(_condition(_field(key), key, "$eq", condition))
    return _all(parts) if parts else None


def _condition(field: str, key: str, name: str, target: Any) -> str:
    """One field operator of the filter language as a Milvus expression."""
    if _infinite(target):
        return _beyond(field, name, target > 0)
    if name in _COMPARISONS:
        return f"{field} {_COMPARISONS[name]} {_literal(target, key)}"
    if name == "$ne":
        return _all([f"exists {field}", f"{field} != {_literal(target, key)}"])
    target = [value for value in target if not _infinite(value)]  # equal to no stored value
    equal_one = _any([f"{field} == {_literal(value, key)}" for value in target]) if target else _NOTHING
    if name == "$in":
        return equal_one
    return _all([f"exists {field}", f"not ({equal_one})"])  # $nin


def _infinite(value: Any) -> bool:
    """A float infinity; an integer never is one (math.isinf of 10**400 overflowed: its literal
    is refused by name)."""
    return isinstance(value, (float, np.floating)) and math.isinf(value)


def _beyond(field: str, name: str, above: bool) -> str:
    """A field operator against an infinite bound, which no Milvus literal holds. No stored
    value is infinite (JSON holds none): every number is below +inf and above -inf."""
    if name == "$ne":
        return f"exists {field}"
    within = {True: ("$lt", "$lte"), False: ("$gt", "$gte")}[above]  # the bounds every number meets
    if name not in within:
        return _NOTHING
    return f"{field} {'<=' if above else '>='} {repr(sys.float_info.max if above else -sys.float_info.max)}"


def _literal(value: Any, key: str) -> str:
    """A filter value as a Milvus literal; a value Milvus cannot compare is refused."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):  # numpy's too: its repr is no Milvus literal
        if not -2**63 < int(value) < 2**63:  # -2**63 too: a server reads it as minus 2**63, past int64
            raise InvalidInputError(f"the filter on {key!r} compares with {int(value)}: a Milvus server compares "
                                    "integers within int64 only (-2**63 aside)")
        return str(int(value))
    if isinstance(value, numbers.Real) and not math.isnan(value):
        return repr(float(value))
    if isinstance(value, str):
        return _string(value)
    raise InvalidInputError(f"the filter on {key!r} compares with {value!r:.60}: the Milvus store compares "
                            "with strings, numbers and booleans only")


def _field(key: str) -> str:
    if not key or "][" in key:  # a server splits a key path at "][": its own error, or another field
        raise InvalidInputError(f"the Milvus store cannot filter on the metadata key {key!r}: a server reads an "
                                "empty key, or one holding '][', as another path")
    return f"metadata[{_string(key)}]"


def _string(value: str) -> str:
    """A double-quoted Milvus string literal: backslashes, quotes and line breaks escaped."""
    if unicode_problem(value):
        raise InvalidInputError(f"the filter holds {value!r:.60}, which is no valid Unicode ({unicode_problem(value)})")
    return '"' + value.translate(_ESCAPES) + '"'


def _huge_integer(value: Any) -> int | None:
    """An integer of a JSON value (at any depth) outside -2**63 .. 2**64 - 1, if any."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return next((huge for item in value if (huge := _huge_integer(item)) is not None), None)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return value
    return None


def _one_of(field: str, values: list[str]) -> str:
    """The expression: ``field`` is one of these strings, each quoted and escaped."""
    return f"{field} in [{', '.join(map(_string, values))}]"


def _among(ids: list[str], condition: str | None) -> list[str]:
    """The expressions choosing, a batch of ids each, the rows of ``ids`` that satisfy
    ``condition`` (None: all of them)."""
    return [_all([_one_of("id", ids[start:start + BATCH_ROWS]), *([condition] if condition else [])])
            for start in range(0, len(ids), BATCH_ROWS)]


def _all(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " and ".join(f"({part})" for part in parts)


def _any(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " or ".join(f"({part})" for part in parts)
