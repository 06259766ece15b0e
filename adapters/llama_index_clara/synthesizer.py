"""ClaraSynthesizer: the retrieved nodes in the layout CLaRa's generator was trained on.

LlamaIndex's own synthesizers work too: ``ClaraLLM`` reads the stored nodes inside their
prompts from memory tokens. This one skips their prompt templates and passes each node's own
text, without the metadata LlamaIndex writes into a prompt, so the generator sees exactly its
answering prompt (``Background:`` memories, then the question; the LLM's ``system_prompt``,
where it has one, in the trained system prompt's place): a node the store holds as it
is now is read from its stored memories, the rest (not stored, or rewritten by a
postprocessor) are compressed from their text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.callbacks import CallbackManager
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import MetadataMode, NodeWithScore
from llama_index.core.types import RESPONSE_TEXT_TYPE

from .llm import ClaraLLM, _user, off_the_loop


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
        return super().synthesize(query, nodes, additional_source_nodes, node_texts=_node_texts(nodes), **kwargs)

    async def asynthesize(self, query: QueryTextType, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **kwargs: Any) -> RESPONSE_TYPE:
        return await super().asynthesize(query, nodes, additional_source_nodes, node_texts=_node_texts(nodes),
                                         **kwargs)

    def get_response(self, query_str: str, text_chunks: Sequence[str],
                     node_texts: list[str] | None = None, **kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """Answer from the nodes' own texts (``text_chunks`` when a caller gives no nodes): the
        store finds those it holds by their text, and the rest are compressed."""
        documents, messages = _documents(text_chunks, node_texts, kwargs), _question(self._clara_llm, query_str)
        if self._streaming:  # the call's options (max_tokens, document_ids) read, or refused, by ClaraLLM
            return (response.delta for response in self._clara_llm.stream_chat(messages, documents=documents, **kwargs))
        return self._clara_llm.chat(messages, documents=documents, **kwargs).message.content

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            node_texts: list[str] | None = None, **kwargs: Any) -> RESPONSE_TEXT_TYPE:
        if not self._streaming:  # a token per worker-thread call: a cancelled call stops generating
            return (await self._clara_llm.achat(_question(self._clara_llm, query_str),
                                                documents=_documents(text_chunks, node_texts, kwargs),
                                                **kwargs)).message.content
        return off_the_loop(await asyncio.to_thread(self.get_response, query_str, text_chunks, node_texts, **kwargs))


def _documents(text_chunks: Sequence[str], node_texts: list[str] | None, kwargs: dict[str, Any]) -> list[str]:
    """What the answer reads: the nodes' own texts, or ``text_chunks`` when a caller gives no nodes
    (``documents`` among the call's options, which go on to ClaraLLM, is refused by name)."""
    if "documents" in kwargs:
        raise TypeError("ClaraSynthesizer reads its nodes as the documents: add stored ones with document_ids=[...]")
    return list(text_chunks) if node_texts is None else node_texts


def _question(llm: ClaraLLM, query_str: str) -> list[ChatMessage]:
    """The question as the user's message, after the LLM's system prompt where it has one, which
    takes the trained one's place (LlamaIndex's own synthesizers add it, through ``predict``;
    this one dropped it)."""
    system = [ChatMessage(role=MessageRole.SYSTEM, content=llm.system_prompt)] if llm.system_prompt else []
    return [*system, _user(query_str)]


def _node_texts(nodes: list[NodeWithScore]) -> list[str]:
    """Each node's text as it is now, without metadata (as the store holds a node it took); a
    blank node has nothing to read."""
    texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
    return [text for text in texts if text.strip()]
