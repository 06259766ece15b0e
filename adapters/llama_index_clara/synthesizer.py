"""ClaraSynthesizer: the retrieved nodes in the layout CLaRa's generator was trained on.

LlamaIndex's own synthesizers work too: ``ClaraLLM`` reads the stored nodes inside their
prompts from memory tokens. This one skips their prompt templates and passes the node ids, so
the generator sees exactly its answering prompt (``Background:`` memories, then the
question); nodes that are not in the store are compressed from their text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.callbacks import CallbackManager
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import MetadataMode, NodeWithScore
from llama_index.core.types import RESPONSE_TEXT_TYPE

from .llm import ClaraLLM, off_the_loop


class ClaraSynthesizer(BaseSynthesizer):
    """Use as ``index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm))``."""

    def __init__(self, llm: ClaraLLM, streaming: bool = False,
                 callback_manager: CallbackManager | None = None) -> None:
        super().__init__(llm=llm, streaming=streaming, callback_manager=callback_manager)
        self._clara_llm = llm

    def _get_prompts(self) -> dict[str, Any]:
        return {}

    def _update_prompts(self, prompts: dict[str, Any]) -> None:
        """There is no prompt template to update: the CLaRa prompt is fixed by training."""

    def synthesize(self, query: QueryTextType, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None, **kwargs: Any) -> RESPONSE_TYPE:
        return super().synthesize(query, nodes, additional_source_nodes, document_ids=self._stored_ids(nodes),
                                  **kwargs)

    async def asynthesize(self, query: QueryTextType, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **kwargs: Any) -> RESPONSE_TYPE:
        ids = await asyncio.to_thread(self._stored_ids, nodes)
        return await super().asynthesize(query, nodes, additional_source_nodes, document_ids=ids, **kwargs)

    def _stored_ids(self, nodes: list[NodeWithScore]) -> list[str] | None:
        """The nodes' ids when the store holds each node's text as it is now, else None: a
        postprocessor may have rewritten a node (a sentence window, a compressed context),
        and then its stored memories no longer say what the node does."""
        store = self._clara_llm.store
        if store is None or not nodes:
            return None
        stored = {document.id: document.text for document in store.get([n.node.node_id for n in nodes])}
        now = [(n.node.node_id, n.node.get_content(metadata_mode=MetadataMode.NONE)) for n in nodes]
        return [node_id for node_id, _ in now] if all(stored.get(i) == text for i, text in now) else None

    def get_response(self, query_str: str, text_chunks: Sequence[str],
                     document_ids: list[str] | None = None, **kwargs: Any) -> RESPONSE_TEXT_TYPE:
        store = self._clara_llm.store
        if document_ids and store is not None and len(store.get(document_ids)) == len(document_ids):
            sources = {"document_ids": document_ids}
        else:
            sources = {"documents": list(text_chunks)}
        if self._streaming:
            return (response.delta for response in self._clara_llm.stream_complete(query_str, **sources))
        return self._clara_llm.complete(query_str, **sources).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            document_ids: list[str] | None = None, **kwargs: Any) -> RESPONSE_TEXT_TYPE:
        response = await asyncio.to_thread(self.get_response, query_str, text_chunks, document_ids, **kwargs)
        return off_the_loop(response) if self._streaming else response
