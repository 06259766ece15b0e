"""Shared fixtures: a tiny, randomly initialised llama built on the spot (no download)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from clara_plugins import ClaraConfig, ClaraModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# every file of it a test reads: a partial copy skips those tests instead of failing them
SHARED_FILES = ("nq/dev.jsonl", "hotpotqa/dev.json", "hotpotqa/train.json", "2wikimultihopqa/dev.json",
                "2wikimultihopqa/train.json", "musique/dev.jsonl", "musique/train.jsonl", "corpus/dpr_wiki_1000.jsonl",
                "corpus/musique_train_1890.json", "corpus/2wiki_6119.json")
needs_shared_data = pytest.mark.skipif(not all((SHARED_DATA / name).exists() for name in SHARED_FILES),
                                       reason="needs ../shared/data")

CORPUS = [
    "Paris is the capital and most populous city of France.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "Berlin is the capital of Germany and its largest city.",
    "The Danube flows through Vienna, Bratislava and Budapest.",
    "Marie Curie won Nobel Prizes in physics and in chemistry.",
    "Question: who wrote the novel? Answer: a writer from Lisbon.",
]

# A template without a system role, like Mistral's: CLaRa must fold the system text in.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_base_model(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    """Write a 2-layer llama with a 300-token BPE vocabulary to ``folder``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = NO_SYSTEM_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # as SmolLM2: its 300-token vocabulary makes long prompts
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


_SETTINGS = ("_embed_model", "_node_parser", "_transformations", "_llm")


@pytest.fixture(scope="session")
def _llama_index_defaults() -> dict:
    """LlamaIndex's global Settings as the session began, before any module's fixtures ran."""
    from llama_index.core import Settings

    return {name: getattr(Settings, name) for name in _SETTINGS}


@pytest.fixture(autouse=True)
def _llama_index_settings(_llama_index_defaults):
    """LlamaIndex's global Settings put back after each test: a ClaraVectorStore sets its
    embedding and node parser there, which later tests would otherwise inherit (and keep a
    model alive), whether a test or a module-scoped fixture built the store."""
    from llama_index.core import Settings

    yield
    for name, value in _llama_index_defaults.items():
        setattr(Settings, name, value)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_base(tmp_path_factory) -> Path:
    """Same architecture and tokenizer corpus, different weights: 'another base model'."""
    return build_tiny_base_model(tmp_path_factory.mktemp("other-llama"), seed=1)


def with_one_records_file(generation: Path, header: dict) -> dict:
    """Rewrite a saved generation's record shards as the one records.json that stores before
    format 3 held; returns the header without the shards, to be written with an older format."""
    records: dict[str, list] = {"ids": [], "texts": [], "metadatas": []}
    header = {**header, "sha256": dict(header["sha256"])}
    for shard in header.pop("record_shards"):
        for field, values in json.loads((generation / shard["file"]).read_text()).items():
            records[field] += values
        (generation / shard["file"]).unlink()
        del header["sha256"][shard["file"]]
    (generation / "records.json").write_text(json.dumps(records))
    header["sha256"]["records.json"] = hashlib.sha256((generation / "records.json").read_bytes()).hexdigest()
    return header


@contextlib.contextmanager
def written_by_another_thread(output: Path, what: str) -> Iterator[None]:
    """``output``'s sole_writer lock, held by another thread of this process for the block."""
    from clara_plugins.atomic import sole_writer

    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with sole_writer(output, what):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        thread.join(30)


def randomize_adapters(model: ClaraModel, seed: int = 0) -> None:
    """Give every LoRA matrix and memory-token row non-trivial values (fresh LoRA B is zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.lm.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        embedding = model.lm.get_input_embeddings().weight
        rows = embedding[model.base_vocab_size:]
        embedding[model.base_vocab_size:] = torch.randn(rows.shape, generator=generator)


@pytest.fixture
def tiny_config(tiny_base) -> ClaraConfig:
    return ClaraConfig(base_model=str(tiny_base), compression_rate=16, doc_max_length=64, max_new_tokens=8)


@pytest.fixture
def tiny_model(tiny_config) -> ClaraModel:
    model = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(model)
    return model


@pytest.fixture
def tiny_tokens_model(tiny_config) -> ClaraModel:
    """The tiny model with Apple's design: states at appended <MEM> positions, flattened keys."""
    model = ClaraModel(dataclasses.replace(tiny_config, memory_design="tokens", retrieval_key="flat"), device="cpu")
    randomize_adapters(model)
    return model


@functools.cache
def shared_untrained_tiny_model() -> ClaraModel:
    """One untrained tiny model for suites whose settings are class properties, not fixtures.

    Fresh adapters are the identity, so the query reasoner encodes a text exactly as the
    compressor does: a document's own text is its nearest query.
    """
    folder = Path(tempfile.mkdtemp(prefix="clara-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a session's folder, gone with it
    build_tiny_base_model(folder)
    return ClaraModel(ClaraConfig(base_model=str(folder), compression_rate=16, doc_max_length=64,
                                  max_new_tokens=8), device="cpu")
