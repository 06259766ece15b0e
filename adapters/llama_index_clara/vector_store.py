"""ClaraVectorStore: LlamaIndex's vector store protocol over a CLaRa MemoryStore.

It stores text (nodes come back whole) and takes the query string rather than a query
embedding (``is_embedding_query=False``): the query reasoner encodes the question and is
compared with the documents' memory tokens.
"""

from __future__ import annotations

import asyncio
import functools
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem
from llama_index.core import Settings
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, MetadataMode, TextNode, TransformComponent
from llama_index.core.vector_stores.simple import DEFAULT_PERSIST_FNAME, DEFAULT_VECTOR_STORE, NAMESPACE_SEP
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
from pydantic import PrivateAttr

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoreError, StoredDocument, store_folder
from clara_plugins.adapter_fields import LeftBehind
from clara_plugins.pretrained import load_model
from clara_plugins.base_store import BaseMemoryStore, StoreLike, as_memory_store, check_store_model, id_list
from clara_plugins.checks import check_fraction, check_positive_int, unicode_problem
from clara_plugins.errors import warn_bounded
from clara_plugins.filters import holds_no_condition
from clara_plugins.keys import KeyEncoder

MMR_PREFETCH_FACTOR = 4.0  # LlamaIndex's database stores re-rank 4 x similarity_top_k nodes by default

from .embedding import ClaraEmbedding, expect_takers, forget_memories, take_memories

_OPERATORS = {FilterOperator.EQ: "$eq", FilterOperator.NE: "$ne", FilterOperator.IN: "$in",
              FilterOperator.NIN: "$nin", FilterOperator.GT: "$gt", FilterOperator.GTE: "$gte",
              FilterOperator.LT: "$lt", FilterOperator.LTE: "$lte"}


def translate_filters(filters: MetadataFilters | None) -> dict | None:
    """LlamaIndex MetadataFilters -> the store's filter dictionary (==, !=, in, nin, >, >=, <, <=; and, or).

    As in the store's (and Milvus') filters, a node without the field matches no operator, ``!=``
    and ``nin`` included, where LlamaIndex's in-memory store counts it a match for those two.
    """
    if filters is None or not filters.filters:
        return None
    parts = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            part = translate_filters(item) or {}  # an empty group restricts nothing
            if filters.condition == FilterCondition.OR and holds_no_condition(part):  # true, it made the or true
                raise InvalidInputError("a nested MetadataFilters under an or holds no filter: leave it out")
            parts.append(part)
        elif isinstance(item, MetadataFilter) and item.operator in _OPERATORS:
            parts.append({item.key: {_OPERATORS[item.operator]: item.value}})
        else:
            raise NotImplementedError(f"filter operator {item.operator!r} is not supported; "
                                      f"use one of {[op.value for op in _OPERATORS]}")
    if filters.condition not in (FilterCondition.AND, FilterCondition.OR, None):
        raise NotImplementedError(f"filter condition {filters.condition!r} is not supported; use and/or")
    return {"$or" if filters.condition == FilterCondition.OR else "$and": parts}


class _CompressorChunks(SentenceSplitter):
    """LlamaIndex's default chunks (1,024 tokens) would be compressed from their first
    ``doc_max_length`` tokens only: chunks that, with their metadata, fit that many tokens of the
    model's own tokenizer (``ClaraConfig.chunk_tokens``)."""

    # in the settings an ingestion cache keys on, with the class name: chunks counted by one
    # backbone's tokenizer were served to another's, as a plain SentenceSplitter's of the same sizes
    tokenizer_name: str = ""

    @classmethod
    def class_name(cls) -> str:
        return "ClaraCompressorChunks"

    @classmethod
    def of(cls, model: ClaraModel) -> _CompressorChunks:
        size = model.config.chunk_tokens  # the tokenizer alone is kept: the model stays freeable
        chunks = cls(chunk_size=size, chunk_overlap=size // 8,
                     tokenizer=functools.partial(model.tokenizer.encode, add_special_tokens=False))
        chunks.tokenizer_name = model.tokenizer.name_or_path
        return chunks

    def _get_metadata_str(self, node: BaseNode) -> str:
        """What the compressor reads beside a chunk's text (its embedding content): the metadata
        and the template's separator (a reader's file_path and page_label cut 42 of 355 chunks)."""
        metadata = node.get_metadata_str(mode=MetadataMode.EMBED)
        template = getattr(node, "text_template", "{metadata_str}\n\n{content}")
        return template.format(metadata_str=metadata, content="") if metadata else ""

    def split_text_metadata_aware(self, text: str, metadata_str: str) -> list[str]:
        """Refuse metadata that leave a chunk no room: LlamaIndex's advice, a larger chunk size,
        makes chunks the compressor reads only the first ``doc_max_length`` tokens of; and metadata
        that are no valid Unicode, which failed in the tokenizer, naming neither document nor field."""
        if (problem := unicode_problem(metadata_str)) is not None:  # e.g. a reader's file_path of a name not in UTF-8
            raise ValueError(f"a document's metadata are not valid Unicode text ({problem}): {metadata_str!r:.120}; "
                             "mend the field or leave it out (a file name that is not UTF-8: rename the file)")
        length = len(self._tokenizer(metadata_str))
        if length >= self.chunk_size:
            raise ValueError(f"a document's metadata take {length} tokens, and the compressor reads {self.chunk_size} "
                             "of a chunk (doc_max_length, 2 spare): leave long fields out of what it reads "
                             "(Document(..., excluded_embed_metadata_keys=[...]))")
        return self._split_text(text, chunk_size=self.chunk_size - length)  # LlamaIndex's own, without its advice


def _split_for(model: ClaraModel) -> None:
    """Make chunks the model reads whole LlamaIndex's default, unless the user chose a parser
    or transformations (a parser an earlier store set is replaced: it fits that store's model)."""
    parser, steps = getattr(Settings, "_node_parser", None), getattr(Settings, "_transformations", None)
    if (parser is None or isinstance(parser, _CompressorChunks)) and (steps is None or steps == [parser]):
        Settings.node_parser = _CompressorChunks.of(model)
        Settings._transformations = None  # rebuilt from the parser when an index asks for them


class ClaraVectorStore(BasePydanticVectorStore):
    """Nodes compressed into CLaRa memory tokens, retrieved by CLaRa's query reasoner.

    Without a model or a store the shipped default model is loaded. ``store`` picks the
    backend: a local ``MemoryStore`` by default, or e.g. ``store=MilvusMemoryStore(model, uri)``
    to keep the nodes in Milvus (or a LangChain ``ClaraVectorStore``, to share its documents).

    ``VectorStoreIndex`` needs no ``embed_model``. It resolves its embedding model from
    LlamaIndex's global ``Settings`` before it looks at its vector store (and by default that
    means OpenAI), so creating a ClaraVectorStore makes its ``embed_model`` the global
    default: ``Settings.embed_model`` is set unless it already holds an embedding model that
    is not a ClaraEmbedding. That embedding hands its memory tokens to this store, which
    keeps them instead of compressing each node twice. Likewise, unless a node parser or
    transformations are set (LlamaIndex sets its default one when an index first needs it),
    documents are split into chunks that, with their metadata, fit the compressor's
    ``doc_max_length`` tokens, which it reads whole (LlamaIndex's 1,024 would be cut).
    An ``IngestionPipeline`` brings its own splitter (1,024 tokens) unless given
    ``transformations``, and hands a store only the nodes that carry an embedding: give it
    ``transformations=store.transformations``, or end transformations of your own with this
    store's ``embed_model``.

    Query modes: ``default`` and ``mmr`` (``mmr_threshold``, in the query or as
    ``vector_store_kwargs``, weighs similarity against diversity; 0.5 by default). MMR re-ranks
    the ``mmr_prefetch_k`` nearest nodes, or ``similarity_top_k`` times ``mmr_prefetch_factor``
    (``vector_store_kwargs``, as LlamaIndex's database stores read them; 4 by default); other
    options are refused. Similarities are cosines. The store searches with the query text
    through the query reasoner, so query transforms that change only the embedding (HyDE's
    ``custom_embedding_strs``) change nothing here.
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False

    _store: BaseMemoryStore = PrivateAttr()
    _embed_model: ClaraEmbedding = PrivateAttr()

    def __init__(self, model: ClaraModel | None = None, *, store: StoreLike | None = None,
                 index: str | None = None, batch_size: int | None = None, memory_dtype: str | None = None) -> None:
        super().__init__()
        # MemoryStore's defaults where None
        settings = {"index": index, "batch_size": batch_size, "memory_dtype": memory_dtype}
        if store is None:
            store = MemoryStore(model if model is not None else load_model(),
                                **{name: value for name, value in settings.items() if value is not None})
        else:  # either framework's ClaraVectorStore too, as ClaraLLM takes it
            store = as_memory_store(store)
            check_store_model(store, model, **settings)
        self._store = store
        expect_takers(store.model)
        self._embed_model = ClaraEmbedding(clara=store.model, embed_batch_size=min(store.batch_size, 2048))  # its cap
        current = getattr(Settings, "_embed_model", None)  # read without resolving the OpenAI default
        if current is None or isinstance(current, ClaraEmbedding):
            Settings.embed_model = self._embed_model
        _split_for(store.model)

    @classmethod
    def class_name(cls) -> str:
        return "ClaraVectorStore"

    def __reduce__(self) -> tuple:
        return LeftBehind, (type(self).__name__,)

    @property
    def client(self) -> BaseMemoryStore:
        return self._store

    @property
    def memory_store(self) -> BaseMemoryStore:
        """The core store (also ``client``): what ClaraLLM and ClaraRetriever read from."""
        return self._store

    @property
    def embed_model(self) -> ClaraEmbedding:
        """An embedding model that hands its compressed nodes to this store."""
        return self._embed_model

    @property
    def transformations(self) -> list[TransformComponent]:
        """An ``IngestionPipeline``'s steps for this store: chunks the compressor reads whole,
        then the embedding whose memory tokens the store takes."""
        return [_CompressorChunks.of(self._store.model), self._embed_model]

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Store the nodes; one without text (a blank page a reader made a node of) has nothing to
        read and is left out, with a warning, as the index's other nodes go in (a node stored under
        its id before is kept)."""
        _refuse_unread("add", kwargs)  # an index's insert(document, **kwargs) hands them on
        texts = [node.get_content(metadata_mode=MetadataMode.NONE) for node in nodes]
        stored = [(node, text) for node, text in zip(nodes, texts) if text.strip()]
        if len(stored) < len(nodes):
            blanks = [node for node, text in zip(nodes, texts) if not text.strip()]
            # one with metadata was compressed from them by the embedding, which keeps its memories for us
            forget_memories(self._store.model, [node.get_content(metadata_mode=MetadataMode.EMBED) for node in blanks])
            blank = blanks[0]
            warn_bounded(f"{len(nodes) - len(stored)} of {len(nodes)} nodes have no text and are not stored "
                         f"(first: {blank.node_id}); a node stored under one of their ids before is kept", stacklevel=2)
        if stored:
            memories = take_memories(self._store.model, [node.get_content(metadata_mode=MetadataMode.EMBED)
                                                         for node, _ in stored], self._store.batch_size)
            self._store.upsert(
                [text for _, text in stored],
                ids=[node.node_id for node, _ in stored],
                metadatas=[node_to_metadata_dict(node, remove_text=True, flat_metadata=False) for node, _ in stored],
                memories=memories,
            )
        return [node.node_id for node in nodes]  # one per node, as the index pairs them

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of a source document."""
        _refuse_unread("delete", delete_kwargs)  # delete_ref_doc(id, delete_from_docstroe=True) deleted, unsaid
        self._store.delete_where({"ref_doc_id": ref_doc_id})

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Delete the nodes named, or those the filters keep; with neither, every node (as
        LlamaIndex's own store does). Another argument, and filters without a condition, are
        refused: ignored, ``filter=`` (LangChain's name) deleted every node."""
        _refuse_unread("delete_nodes", delete_kwargs)
        if node_ids is None and filters is not None and holds_no_condition(translate_filters(filters) or {}):
            raise InvalidInputError("these filters hold no condition, so they select every node: call clear() to "
                                    "delete them all")
        ids = None if node_ids is None else id_list(node_ids, "node_ids", ordered=False)
        self._store.delete_where(translate_filters(filters), ids)  # chosen and deleted at once

    def get_nodes(self, node_ids: list[str] | None = None,
                  filters: MetadataFilters | None = None) -> list[BaseNode]:
        ids = None if node_ids is None else id_list(node_ids, "node_ids", ordered=False)
        return [self._to_node(d) for d in self._store.get_where(translate_filters(filters), ids)]

    def clear(self) -> None:
        self._store.delete_where()

    @staticmethod
    def _to_node(stored: StoredDocument) -> BaseNode:
        """The node as added; a document that another writer stored (LangChain's store, ``clara
        index``, a shared Milvus collection) has no node fields, and comes back as a text node."""
        try:
            node = metadata_dict_to_node(stored.metadata, text=stored.text) if "_node_content" in stored.metadata \
                else None
        except (ValueError, TypeError, RecursionError):  # not a node's JSON after all (another writer's field)
            node = None
        if node is None:
            return TextNode(id_=stored.id, text=stored.text, metadata=stored.metadata)
        node.embedding = None
        return node

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        unread = sorted(set(kwargs) - set(_QUERY_OPTIONS))
        if unread:  # a misspelt option fell back to its default unseen
            raise ValueError(f"ClaraVectorStore reads no query option {', '.join(map(repr, unread))}; its options "
                             f"(vector_store_kwargs) are {', '.join(_QUERY_OPTIONS)}")
        if not query.query_str:
            raise ValueError("ClaraVectorStore searches with the query text (query_str), not an embedding")
        mode = VectorStoreQueryMode(query.mode)  # a plain dataclass: a mode given as a string stays one
        if mode not in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR):
            raise NotImplementedError(f"query mode {mode.value!r} is not supported; use 'default' or 'mmr'")
        check_positive_int("similarity_top_k", query.similarity_top_k)  # 0 is no "every node" here
        lambda_mult, fetch_k = 1.0, query.similarity_top_k  # fetch_k: the nodes MMR re-ranks (unused otherwise)
        if mode == VectorStoreQueryMode.MMR:
            threshold = query.mmr_threshold if query.mmr_threshold is not None else kwargs.get("mmr_threshold")
            lambda_mult = 0.5 if threshold is None else check_fraction("mmr_threshold", threshold)
            fetch_k = _mmr_fetch_k(query.similarity_top_k, kwargs)
        elif kwargs or query.mmr_threshold is not None:  # read in MMR mode alone: ignored, unsaid
            raise ValueError(f"{', '.join(sorted(kwargs) or ['mmr_threshold'])} weigh MMR re-ranking: ask for it "
                             "with vector_store_query_mode='mmr'")
        where = translate_filters(query.filters)
        if query.doc_ids is not None:  # the nodes of these source documents
            of_documents = {"ref_doc_id": {"$in": id_list(query.doc_ids, "doc_ids", ordered=False)}}  # not letters
            where = of_documents if where is None else {"$and": [where, of_documents]}
        # an index over a store that keeps the text holds no node ids, and its retrievers pass []:
        # an empty list restricts nothing
        search = functools.partial(self._store.search, query.query_str, query.similarity_top_k, where,
                                   lambda_mult=lambda_mult, fetch_k=fetch_k)
        if not query.node_ids:
            results = search()
        else:
            stored = self._store.stored_ids(query.node_ids)
            if not stored:
                # the index's IndexNode and ImageNode ids alone, one of them left out for having no text:
                # every query found nothing, unsaid
                warn_bounded(f"none of the {len(query.node_ids)} node_ids this query is restricted to is stored; an "
                             "index that mixes IndexNode or ImageNode with text nodes restricts its queries to their "
                             "ids unless built with VectorStoreIndex(..., store_nodes_override=True)", stacklevel=2)
            if stored and len(stored) == len(self._store) and lambda_mult == 1.0:  # MMR's pool is not returned
                # every stored node (an index built with store_nodes_override=True names them all): the
                # store's own index searches, where a restriction scored every document exactly; a node
                # written since (by another index sharing the store) is left out by searching again
                results = search()
                if any(document.id not in stored for document, _ in results):
                    results = search(ids=query.node_ids)
            else:
                results = search(ids=query.node_ids)
        return VectorStoreQueryResult(
            nodes=[self._to_node(d) for d, _ in results],
            similarities=[score for _, score in results],
            ids=[d.id for d, _ in results],
        )

    # The async methods compress and search on worker threads, so that the event loop goes on meanwhile.
    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        return await asyncio.to_thread(self.add, nodes, **kwargs)

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete, ref_doc_id, **delete_kwargs)

    async def adelete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                            **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete_nodes, node_ids, filters, **delete_kwargs)

    async def aget_nodes(self, node_ids: list[str] | None = None,
                         filters: MetadataFilters | None = None) -> list[BaseNode]:
        return await asyncio.to_thread(self.get_nodes, node_ids, filters)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await asyncio.to_thread(self.query, query, **kwargs)

    def persist(self, persist_path: str, fs: AbstractFileSystem | None = None) -> None:
        """Save the store, a folder: ``persist_path`` with ``.clara`` in place of a ``.json`` or
        ``.clara`` suffix, or after any other name.

        ``StorageContext.persist(persist_dir=d)`` passes ``d/default__vector_store.json``, so
        the store lands in ``d/default__vector_store.clara``; ``from_persist_dir(d)`` reads it.
        A store kept in a database (``MilvusMemoryStore``) is already persisted: nothing is written.
        """
        if not isinstance(self._store, MemoryStore):
            return
        self._store.save(_store_folder(_local_path(persist_path, fs)))

    @classmethod
    def from_persist_path(cls, persist_path: str | Path, model: ClaraModel | None = None,
                          fs: AbstractFileSystem | None = None, keys: KeyEncoder | None = None) -> ClaraVectorStore:
        """The store ``persist(persist_path)`` saved, or the store folder ``persist_path`` itself
        (``clara index --store``, LangChain's ``save_local``); it must be read with the model
        that wrote it, and the key encoder it searched with (``keys``: a LangChain store's
        embedding, ``langchain_clara.embeddings.EmbeddingsKeys(embedding)``), if not CLaRa's own."""
        path = _local_path(persist_path, fs)
        folder = _store_folder(path)
        earlier = path.with_suffix(".clara")  # where earlier versions saved "run.v1", and "run.v2"
        if not folder.exists() and earlier.exists():
            raise StoreError(f"no store at {folder}; earlier versions may have saved {persist_path} to {earlier}, "
                             f"where they saved every name that differs after its last dot: rename it to "
                             f"{folder.name} if it is this store")
        store_folder.current_generation(folder)  # no store there: refused before the shipped model loads
        return cls(store=MemoryStore.load(folder, model if model is not None else load_model(), keys))

    @classmethod
    def from_persist_dir(cls, persist_dir: str | Path, model: ClaraModel | None = None,
                         namespace: str = DEFAULT_VECTOR_STORE, fs: AbstractFileSystem | None = None,
                         keys: KeyEncoder | None = None) -> ClaraVectorStore:
        """The store ``StorageContext.persist(persist_dir)`` saved: pass it back as
        ``StorageContext.from_defaults(persist_dir=..., vector_store=...)``."""
        path = f"{str(persist_dir).rstrip('/')}/{namespace}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}"
        return cls.from_persist_path(path, model, fs, keys)


def _local_path(persist_path: str | Path, fs: AbstractFileSystem | None) -> Path:
    """A path on the local file system, read as LlamaIndex's JSON stores beside the store read it:
    a ``file://`` one too, and the ``file:/`` that ``StorageContext.persist`` makes of it (each
    was read as a folder named ``file:`` in the working directory)."""
    protocol, _ = split_protocol(str(persist_path))
    if (fs is not None and not isinstance(fs, LocalFileSystem)) or protocol not in (None, "file", "local"):
        raise NotImplementedError("ClaraVectorStore persists to the local file system only")
    return Path(LocalFileSystem._strip_protocol(str(persist_path)))


def _store_folder(path: Path) -> Path:
    """``path`` with its ``.json`` suffix (or ``.clara``) made ``.clara``, or with ``.clara``
    added after any other name, so that ``run.v1`` and ``run.v2`` stay two stores; or ``path``
    itself where it is a store folder and that one is not (``clara index --store``'s, LangChain's
    ``save_local``'s: opened and persisted by its own name, not forked into a copy beside it)."""
    named = path.with_suffix(".clara") if path.suffix in (".json", ".clara") else path.with_name(path.name + ".clara")
    return path if not named.exists() and (path / "CURRENT").is_file() else named


_QUERY_OPTIONS = ("mmr_threshold", "mmr_prefetch_k", "mmr_prefetch_factor")


def _refuse_unread(method: str, kwargs: dict[str, Any]) -> None:
    """Refuse arguments a method would ignore: ignored, ``filter=`` (LangChain's name) made
    ``delete_nodes`` delete every node."""
    if kwargs:
        raise TypeError(f"ClaraVectorStore.{method} takes no {', '.join(sorted(kwargs))}")


def _mmr_fetch_k(top_k: int, kwargs: dict[str, Any]) -> int:
    """The nodes an MMR query re-ranks, as LlamaIndex's database stores count them:
    ``mmr_prefetch_k``, or ``top_k`` x ``mmr_prefetch_factor`` (4 by default), never fewer than ``top_k``."""
    prefetch_k, factor = kwargs.get("mmr_prefetch_k"), kwargs.get("mmr_prefetch_factor")
    if prefetch_k is not None and factor is not None:
        raise ValueError("give mmr_prefetch_k or mmr_prefetch_factor, not both")
    if prefetch_k is not None:
        check_positive_int("mmr_prefetch_k", prefetch_k)  # -3 and True fell back to top_k, 2.9 was 2
        return max(top_k, int(prefetch_k))
    factor = MMR_PREFETCH_FACTOR if factor is None else factor
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < factor < math.inf:
        raise ValueError(f"mmr_prefetch_factor must be a positive number, got {factor!r}")
    return max(top_k, math.ceil(top_k * factor))
