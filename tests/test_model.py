"""ClaraModel on a tiny random llama: tokens, compression, retrieval, generation, gradients."""

import dataclasses
import json
import re
import warnings

import pytest
import torch

from clara_plugins import CheckpointError, ClaraConfig, ClaraModel, InvalidInputError, MemoryStore
from clara_plugins.passes import completion_log_likelihood, encode_with_gradients, set_trainable
from clara_plugins.prompts import question_prompt
from clara_plugins.retrieval import cosine_scores
from conftest import CORPUS, build_tiny_base_model, randomize_adapters


def test_special_tokens_are_appended_in_order(tiny_model):
    tok = tiny_model.tokenizer
    n = tiny_model.config.n_mem_tokens
    assert n == 64 // 16
    expected = [f"<MEM{i}>" for i in range(n)] + ["<AE>", "<ENC>", "<SEP>"]
    ids = tok.convert_tokens_to_ids(expected)
    assert ids == list(range(tiny_model.base_vocab_size, tiny_model.base_vocab_size + n + 3))
    assert tiny_model.lm.get_input_embeddings().weight.size(0) == len(tok)


@pytest.mark.parametrize("rate,n_mem", [(1, 64), (4, 16), (64, 1)])
def test_compression_rate_sets_memory_length(tiny_base, rate, n_mem):
    model = ClaraModel(ClaraConfig(base_model=str(tiny_base), compression_rate=rate, doc_max_length=64),
                       device="cpu")
    assert model.compress_documents(CORPUS[:2]).shape == (2, n_mem, 32)


def test_compression_is_batch_independent_and_gradient_free(tiny_model):
    together = tiny_model.compress_documents(CORPUS[:4], batch_size=4)
    alone = torch.cat([tiny_model.compress_documents([d]) for d in CORPUS[:4]])
    assert together.shape == (4, 4, 32)
    assert not together.requires_grad
    assert torch.allclose(together, alone, atol=1e-5)


def _apple_layout_states(model: ClaraModel, text: str, appended: list[int], layer: int = -1):
    """Apple pads every document to doc_max_length + 3 and passes no position ids."""
    tok = model.tokenizer
    body = tok(text, add_special_tokens=False)["input_ids"]
    sequence = [model.enc_token_id, tok.bos_token_id, *body, tok.eos_token_id]
    width = model.config.doc_max_length + 3
    ids = torch.tensor([[tok.pad_token_id] * (width - len(sequence)) + sequence + appended])
    mask = (torch.arange(ids.size(1)) >= width - len(sequence)).long().unsqueeze(0)
    model.lm.set_adapter("encoder_adapter")
    with torch.no_grad():
        output = model.lm.get_base_model().base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return output.hidden_states[layer] if layer != -1 else output.last_hidden_state, len(body), width


@pytest.mark.parametrize("field", ["generation_top_k", "max_new_tokens", "lora_r"])
def test_a_count_below_one_is_refused_by_the_config(field):
    # generation_top_k 0 failed in top_k on the first chat call; max_new_tokens 0 answered nothing
    with pytest.raises(ValueError, match=f"ClaraConfig.{field} must be at least 1, got 0"):
        ClaraConfig(**{field: 0})


@pytest.mark.parametrize("values, message", [({"lora_alpha": 0}, "lora_alpha must be positive"),
                                             ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)")])
def test_adapter_and_layer_settings_out_of_range_are_refused_by_the_config(values, message):
    # lora_alpha 0 scaled every adapter to nothing: a run trained and saved an untrained model
    with pytest.raises(ValueError, match=message):
        ClaraConfig(**values)


def test_a_memory_layer_beyond_the_base_models_is_refused_when_it_loads(tiny_config):
    # it failed with a bare IndexError at the first compression
    layers = ClaraModel(tiny_config, device="cpu").lm.config.num_hidden_layers
    for layer in (layers + 1, -layers - 2):
        with pytest.raises(ValueError, match=f"memory_layer is {layer}, but .* has {layers} layers"):
            ClaraModel(dataclasses.replace(tiny_config, memory_layer=layer), device="cpu")


def test_a_long_query_keeps_the_question_at_its_end(tiny_model):
    # a chat turn's instructions came first and filled the query: two questions encoded alike
    preamble = "Answer briefly and cite nothing. " * 40
    questions = [preamble + "Who won prizes?", preamble + "Where is Vienna?"]
    first, second = tiny_model.encode_queries(questions)
    assert not torch.allclose(first, second)
    trained = encode_with_gradients(tiny_model, questions, "query_reasoner_adapter")[0]  # as training reads them
    assert torch.allclose(trained.detach(), torch.stack([first, second]), atol=1e-5)


def test_tokens_design_reads_the_appended_memory_positions(tiny_config):
    model = ClaraModel(dataclasses.replace(tiny_config, memory_design="tokens"), device="cpu")
    randomize_adapters(model)
    hidden, _, _ = _apple_layout_states(model, CORPUS[0], model.mem_token_ids)
    assert torch.allclose(model.compress_documents([CORPUS[0]])[0], hidden[0, -4:], atol=1e-5)


@pytest.mark.parametrize("pooling,layer", [("mean", -1), ("last", -1), ("mean", 1), ("mean", -2)])
def test_pooled_design_pools_equal_chunks_of_the_document(tiny_config, pooling, layer):
    model = ClaraModel(dataclasses.replace(tiny_config, memory_pooling=pooling, memory_layer=layer), device="cpu")
    randomize_adapters(model)
    hidden, length, width = _apple_layout_states(model, CORPUS[1], [], layer)
    body = hidden[0, width - 1 - length: width - 1]  # the document's tokens, before eos
    chunks = [body[i * length // 4:(i + 1) * length // 4] for i in range(4)]
    expected = torch.stack([c.mean(0) if pooling == "mean" else c[-1] for c in chunks])
    assert torch.allclose(model.compress_documents([CORPUS[1]])[0], expected, atol=1e-5)


def test_pooled_design_handles_documents_shorter_than_the_memory(tiny_model):
    memories = tiny_model.compress_documents(["Paris", CORPUS[0]])
    assert memories.shape == (2, 4, 32) and torch.isfinite(memories).all()


def test_memory_scale_gives_every_vector_the_embedding_norm(tiny_config):
    model = ClaraModel(dataclasses.replace(tiny_config, memory_scale=True), device="cpu")
    norms = model.compress_documents(CORPUS[:2]).norm(dim=-1)
    embedding_norm = model.lm.get_input_embeddings().weight.detach()[: model.base_vocab_size].norm(dim=-1).mean()
    assert torch.allclose(norms, embedding_norm.expand_as(norms), atol=1e-4)
    document_means = encode_with_gradients(model, CORPUS[:2])[1]  # SCP's MSE target, on the memories' scale
    assert torch.allclose(document_means.norm(dim=-1), embedding_norm.expand(2), atol=1e-4)
    # an fp16 vector longer than fp16 holds, all its entries within it: its length was an inf,
    # and the vector came back zeros
    from clara_plugins.model import scaled_to

    vectors = torch.zeros(2, 576, dtype=torch.float16)
    vectors[0, :3], vectors[1, 0] = 40000, 24
    assert torch.allclose(scaled_to(vectors, 2.0).float().norm(dim=-1), torch.tensor([2.0, 2.0]), rtol=1e-3)


def test_compression_uses_the_encoder_adapter_only(tiny_model):
    before_docs = tiny_model.compress_documents(CORPUS[:2])
    before_queries = tiny_model.encode_queries(["Where is Paris?"])
    with torch.no_grad():
        for name, parameter in tiny_model.lm.named_parameters():
            if "lora_B.encoder_adapter" in name:
                parameter.add_(0.5)
    assert not torch.allclose(before_docs, tiny_model.compress_documents(CORPUS[:2]))
    assert torch.allclose(before_queries, tiny_model.encode_queries(["Where is Paris?"]))


def test_truncation_is_reported(tiny_model):
    long_document = " ".join(CORPUS * 3)
    with pytest.warns(UserWarning, match="1 of 2 documents exceed doc_max_length=64"):
        result = tiny_model.compress([CORPUS[0], long_document])
    assert result.truncated_tokens == [0, result.token_counts[1] - 64]
    assert result.truncated_tokens[1] > 0
    with pytest.warns(UserWarning, match="1 of 2 documents exceed doc_max_length=64"):
        tiny_model.compress_documents([CORPUS[4][:20], long_document])


@pytest.mark.parametrize(
    "documents,message",
    [([], "empty"), (["ok", 3], r"documents\[1\] is a int"), (["  "], "only whitespace"),
     ("a string", "must be a list")],
)
def test_bad_documents_raise_clear_errors(tiny_model, documents, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_model.compress_documents(documents)


def _generator_inputs(model: ClaraModel, call) -> torch.Tensor:
    """The input embeddings the generator's first pass receives while ``call()`` runs."""
    seen = []
    layer = model.lm.get_base_model().model.layers[0]
    hook = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return seen[0]


def test_memories_are_injected_at_the_placeholder_positions(tiny_model):
    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)  # [1, k=2, n, h]
    embeds = _generator_inputs(tiny_model, lambda: tiny_model.answer(["Who?"], memories, max_new_tokens=1))
    prompt = question_prompt(tiny_model.tokenizer, "Who?", 2, tiny_model.document_placeholder)
    prompt_ids = torch.tensor(tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    slots = torch.isin(prompt_ids, torch.tensor(tiny_model.mem_token_ids))
    assert int(slots.sum()) == 2 * 4
    assert torch.allclose(embeds[0, slots], memories.reshape(-1, 32))
    sep = tiny_model.tokenizer.convert_tokens_to_ids("<SEP>")
    sep_rows = embeds[0, prompt_ids == sep]
    assert len(sep_rows) == 2
    assert torch.allclose(sep_rows, tiny_model.lm.get_input_embeddings().weight[sep].expand_as(sep_rows))


def test_system_role_falls_back_into_the_user_turn(tiny_model):
    prompt = question_prompt(tiny_model.tokenizer, "Who?", 1, tiny_model.document_placeholder)
    assert prompt.startswith("<|user|>You are a helpful assistant.")
    assert "Background:\n<MEM0><MEM1><MEM2><MEM3><SEP>\n\nQuestion:Who?" in prompt
    assert prompt.endswith("<|assistant|>")


# Qwen3's shape: a finished assistant turn gets an empty think block the opened turn lacks
THINK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_writes_the_finished_turn_otherwise_trains_the_answer_after_the_prompt(tmp_path):
    # the labels started at the prompt's length inside a conversation it was no prefix of: the
    # generator learned to write the think block, and no stop token ended its answers
    from transformers import AutoTokenizer

    folder = build_tiny_base_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(folder)
    prompt = question_prompt(tokenizer, "Who?", 1, "<d>")
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Marie Curie") == prompt + "Marie Curie<|im_end|>\n"
    model = ClaraModel(ClaraConfig(base_model=str(folder), compression_rate=16, doc_max_length=64), device="cpu")
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.stop_token_ids


def test_a_turn_end_marked_special_only_where_it_was_added_stops_generation(tmp_path):
    # the token was special in the vocabulary but in no special-token list (Llama 3's <|eot_id|>):
    # answers ran on into a made-up next turn, and training taught "<|im_end|>\n</s>"
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    folder = build_tiny_base_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("<|im_end|>", special=True)])
    tokenizer.chat_template = THINK_TEMPLATE.replace("<think>\n\n</think>\n\n", "")
    tokenizer.save_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end not in tokenizer.all_special_ids
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Curie").endswith("Curie<|im_end|>\n")
    model = ClaraModel(ClaraConfig(base_model=str(folder), compression_rate=16, doc_max_length=64), device="cpu")
    assert end in model.stop_token_ids
    # and typed into a question it is refused as a control token, as the listed ones are
    with pytest.raises(InvalidInputError, match="question 0 holds '<\\|im_end\\|>'"):
        model.answer(["Who?<|im_end|>"], torch.zeros(1, 1, model.config.n_mem_tokens, model.hidden_size))


def test_a_template_that_reads_the_clock_writes_one_fixed_day(tmp_path):
    # SmolLM3's writes today's date: a prompt and its answer changed from day to day, and a
    # checkpoint loaded the next day was told its template lays prompts out otherwise
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = ("{%- set today = strftime_now('%d %B %Y') -%}Today: {{ today }} ({{ strftime_now(\"%Y\") }})"
                               "\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    prompt = question_prompt(tokenizer, "Who?", 1, "<d>")
    assert prompt.startswith("Today: 26 July 2024 (2024)\nsystem: ") and prompt.endswith("assistant:")
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Curie").startswith(prompt)


def test_a_turn_end_after_a_space_is_found(tmp_path):
    # Llama 2 ends an answer with " </s>": its first token is a space, and the turn end was taken
    # for plain text, so the reading gain counted the space and the </s> as the answer's tokens
    from transformers import AutoTokenizer

    from clara_plugins.prompts import turn_end_token

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] | trim }} "
                               "{{ eos_token }}{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Curie").endswith(" Curie " + tokenizer.eos_token)
    assert turn_end_token(tokenizer) == tokenizer.eos_token_id


def test_a_template_whose_turn_ends_in_plain_text_is_trained_to_stop_at_its_eos(tmp_path):
    # "role: text\n" turns: nothing taught the generator to stop, and no stop token ended its answers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    prompt = question_prompt(tokenizer, "Who?", 1, "<d>")  # opened without its space: the answer writes it
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Marie Curie") == prompt + " Marie Curie\n" + tokenizer.eos_token


@pytest.mark.parametrize("adds_bos", [True, False])
def test_the_plain_text_layout_starts_with_the_bos_the_tokenizer_adds(tmp_path, adds_bos):
    # a base model without a chat template (Llama-2, Mistral) read every prompt without its BOS
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = None
    if adds_bos:
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    prompt = question_prompt(tokenizer, "Who?", 1, "<d>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == adds_bos and ids.count(tokenizer.bos_token_id) == int(adds_bos)
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Marie Curie") == prompt + " Marie Curie" + tokenizer.eos_token


def test_the_plain_text_layout_labels_earlier_answers(tmp_path):
    # without a chat template a conversation's earlier answer read as one more paragraph of the user's
    from transformers import AutoTokenizer

    from clara_plugins.prompts import render_messages

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Rome?"},
                {"role": "assistant", "content": "Italy."}, {"role": "user", "content": "And Paris?"}]
    assert render_messages(tokenizer, messages) == "Be brief.\n\nWhere is Rome?\nAnswer: Italy.\n\nAnd Paris?\nAnswer:"


def test_the_embedding_norm_is_that_of_the_embeddings_the_generator_reads():
    # Gemma scales its embedding module's output by sqrt(hidden): memory_scale sized memories
    # by the weights alone, about sqrt(hidden) times smaller than the tokens around them
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from clara_plugins.backbone import embedding_norm

    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    gemma, llama = Gemma2ForCausalLM(Gemma2Config(head_dim=32, **sizes)), LlamaForCausalLM(LlamaConfig(**sizes))
    graded = []  # read without gradients: with them, every ClaraModel warned, and failed under -W error
    llama.get_input_embeddings().register_forward_hook(lambda module, inputs, output: graded.append(output.requires_grad))
    for model, scale in [(gemma, 64 ** 0.5), (llama, 1.0)]:
        rows = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
        assert embedding_norm(model) == pytest.approx(scale * float(rows), rel=1e-3)
    assert graded == [False]


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_is_float16_on_a_gpu_without_bfloat16(monkeypatch, bf16, expected):
    # a T4 or V100 was given bfloat16, which it emulates slowly or not at all
    from clara_plugins.backbone import resolve_dtype

    asked = []  # the chosen card's capability (is_bf16_supported asked the current one's)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (
        (8, 0) if bf16 else (7, 5)))
    assert resolve_dtype("auto", torch.device("cuda:1")) == expected and asked == [torch.device("cuda:1")]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    # a dtype by name is taken as the torch dtype is ("float64" was refused, torch.float64 taken)
    for name in ("float32", "bfloat16", "float16", "float64"):
        assert resolve_dtype(name, torch.device("cpu")) == resolve_dtype(getattr(torch, name), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown dtype 'int8': use auto, float32, bfloat16, float16 or float64"):
        resolve_dtype("int8", torch.device("cpu"))
    for float64 in ("float64", torch.float64):  # refused by torch once the whole model had loaded
        with pytest.raises(ValueError, match="Apple's MPS computes in no float64"):
            resolve_dtype(float64, torch.device("mps"))
    assert resolve_dtype("float32", torch.device("mps")) == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_stored_and_fresh_memories_on_two_devices_answer_in_one_batch(tiny_config):
    # the groups were joined before they were moved: "Expected all tensors to be on the same device"
    model = ClaraModel(tiny_config, device="cuda")
    fresh = model.compress_documents(CORPUS[:1])
    prompts = [question_prompt(model.tokenizer, "Who?", 1, model.document_placeholder)] * 2
    answers = model.generate(prompts, [fresh.cpu(), fresh])
    assert answers[0] == answers[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_query_reasoners_pick_ranks_stored_memories_beside_a_gpu_model(tiny_config):
    # stored memories stay on the CPU: "Expected all tensors to be on the same device"
    from clara_plugins import top_k

    model = ClaraModel(tiny_config, device="cuda")
    stored = model.compress_documents(CORPUS[:3]).cpu()
    assert top_k(model.encode_queries(["Who?"]), stored, 2, model.config.retrieval_key)[1].shape == (1, 2)


def test_generation_batched_equals_single_and_streaming(tiny_model):
    memories = tiny_model.compress_documents(CORPUS[:4]).reshape(2, 2, 4, 32)
    questions = ["Who won prizes?", "What is the capital of Germany and its largest city?"]
    batched = tiny_model.generate_from_compressed_documents_and_questions(questions, memories)
    single = [tiny_model.generate_from_compressed_documents_and_questions([q], m.unsqueeze(0))[0]
              for q, m in zip(questions, memories)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    streamed = "".join(tiny_model.stream_answer(questions[0], memories[0]))
    assert streamed.strip() == batched[0]


def test_decoding_passes_its_cache_by_the_name_transformers_reads(tiny_model):
    # past_key_values is deprecated (removed in transformers 5.40): decoding warned on every answer
    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        answer = tiny_model.generate_from_compressed_documents_and_questions(["Who?"], memories, max_new_tokens=3)
    assert len(answer) == 1


def test_a_streamed_answer_is_the_collected_one_without_its_trailing_whitespace(tiny_model):
    # the stream kept a last "\n" that generate strips
    from clara_plugins.generation import collect_answers, stream_text

    tok = tiny_model.tokenizer
    ids = tok("Paris is big \n", add_special_tokens=False)["input_ids"]
    steps = lambda: iter(torch.tensor([i]) for i in ids)  # noqa: E731
    assert "".join(stream_text(tok, steps(), set())) == collect_answers(tok, steps(), 1, set())[0] == "Paris is big"


def test_decoding_runs_no_pass_after_its_last_token(tiny_model):
    # a pass for a token that max_new_tokens leaves unread
    from clara_plugins.generation import greedy_steps

    passes = []

    def forward(**inputs):
        passes.append(inputs["inputs_embeds"].size(1))
        return tiny_model.lm(**inputs)

    embeds = tiny_model.lm.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with tiny_model._adapter("decoder_adapter"):
        tokens = list(greedy_steps(forward, tiny_model.lm.get_input_embeddings(), embeds, torch.ones(1, 3), 3, []))
    assert len(tokens) == 3 and passes == [3, 1, 1]


def test_generate_from_questions_refuses_k_below_one_before_compressing(tiny_model, monkeypatch):
    # k=0 read the config's generation_top_k
    monkeypatch.setattr(tiny_model, "compress", lambda *a, **k: pytest.fail("compressed"))
    with pytest.raises(InvalidInputError, match="k must be a positive integer, got 0"):
        tiny_model.generate_from_questions(["Where?"], [CORPUS[:3]], k=0)
    for generate in (tiny_model.generate_from_questions, tiny_model.generate_from_text):
        with pytest.raises(InvalidInputError, match="max_new_tokens must be a positive integer, got 0"):
            generate(["Where?"], [CORPUS[:3]], max_new_tokens=0)  # refused once every document was compressed


def test_apples_method_names_warn_of_cut_documents_at_their_caller(tiny_model):
    # the warning named clara_plugins/model.py, where compress_documents called compress
    long = " ".join(CORPUS * 10)
    for call in (lambda: tiny_model.compress_documents([long]),
                 lambda: tiny_model.generate_from_text(["Who?"], [[long]], max_new_tokens=1),
                 lambda: tiny_model.generate_from_questions(["Who?"], [[long, CORPUS[0]]], k=1, max_new_tokens=1)):
        with pytest.warns(UserWarning, match="1 of .* documents exceed doc_max_length") as caught:
            call()
        assert [warning.filename for warning in caught] == [__file__]


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_a_batch_size_below_one_is_refused(tiny_model, batch_size):
    # -1 ran no batch and returned the uninitialised tensor as memories, which a store saved
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        tiny_model.compress(CORPUS[:2], batch_size=batch_size)
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        tiny_model.encode_queries(["Who?"], batch_size=batch_size)
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        MemoryStore(tiny_model, batch_size=batch_size)


def test_memories_of_another_shape_are_refused_by_generate(tiny_model):
    # as many vectors as slots, of another rate's shape, were spread over the slots in another order
    memories = tiny_model.compress_documents(CORPUS[:2])  # [2, n_mem, hidden]
    prompt = question_prompt(tiny_model.tokenizer, "Who?", 2, tiny_model.document_placeholder)
    wrong = memories.reshape(4, memories.size(1) // 2, memories.size(2))
    with pytest.raises(InvalidInputError, match="memories have shape"):
        tiny_model.generate([prompt], [wrong])
    # float64 memories (numpy's default) were moved to the device before their cast, which Apple's GPU refuses
    assert tiny_model._as_batched_memories(["Who?"], memories.double().numpy()).dtype == torch.float32
    with pytest.raises(InvalidInputError, match="finite in torch.float32: some lie past its range"):  # as given: finite
        tiny_model.answer(["Who?"], torch.full_like(memories, 1e39, dtype=torch.float64))
    # answer named the shape it had made of them, not the one passed
    with pytest.raises(InvalidInputError, match=re.escape(f"of shape {tuple(memories.transpose(1, 2).shape)} do not fit")):
        tiny_model.answer(["Who?"], memories.transpose(1, 2))


def test_a_query_longer_than_doc_max_length_is_encoded_from_its_end_with_a_warning(tiny_model):
    with pytest.warns(UserWarning, match="1 of 1 queries exceed doc_max_length"):
        tiny_model.encode_queries([" ".join(["word"] * 200) + " Who won?"])


def test_loading_a_model_warns_of_no_deprecation(tiny_config):
    # peft read transformers' deprecated `is_gradient_checkpointing` on every load
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ClaraModel(tiny_config, device="cpu")


def test_prompt_text_holding_clara_memory_tokens_is_refused(tiny_model):
    # the tokens would take memory slots no document fills
    with pytest.raises(InvalidInputError, match="must not contain CLaRa's <MEM> tokens"):
        tiny_model.generate(["Tell me about <MEM0> please."])


def test_decoding_computes_the_logits_of_the_last_position_only(tiny_model, monkeypatch):
    # the first pass computed the whole vocabulary at every prompt position: most of a long prompt's work
    decode, lengths = tiny_model._decode, []

    def recorded(**inputs):
        out = decode(**inputs)
        lengths.append(out.logits.size(1))
        return out

    monkeypatch.setattr(tiny_model, "_decode", recorded)
    tiny_model.answer(["Who?"], tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0), max_new_tokens=3)
    assert lengths and set(lengths) == {1}


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_an_answer_length_below_one_token_is_refused(tiny_model, limit):
    # 0 fell back to the config's 64 tokens; -1 answered nothing
    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        tiny_model.answer(["Who?"], memories, max_new_tokens=limit)
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        list(tiny_model.stream_answer("Who?", memories[0], max_new_tokens=limit))


def test_a_prompt_past_the_context_window_is_refused(tiny_model):
    # it ran: a rotary model answered from positions it never saw, one with learned positions failed on an index
    window = tiny_model.lm.config.max_position_embeddings
    long_prompt = " ".join(["word"] * window)
    with pytest.raises(InvalidInputError, match=f"past the model's context window of {window}"):
        tiny_model.generate([long_prompt], None, 4)
    with pytest.raises(InvalidInputError, match="past the model's context window"):
        list(tiny_model.stream(long_prompt, None, 4))


def test_a_numpy_integer_answer_length_is_a_length(tiny_model):
    import numpy as np

    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)
    assert tiny_model.answer(["Who?"], memories, max_new_tokens=np.int64(2)) == \
        tiny_model.answer(["Who?"], memories, max_new_tokens=2)


def test_answers_depend_on_the_memories(tiny_model):
    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)
    prompt = question_prompt(tiny_model.tokenizer, "Who?", 2, tiny_model.document_placeholder)
    full = question_prompt(tiny_model.tokenizer, "Who?", 2, tiny_model.document_placeholder, "Marie Curie")
    with torch.no_grad():
        own, _ = completion_log_likelihood(tiny_model, [prompt], [full], memories)
        blank, _ = completion_log_likelihood(tiny_model, [prompt], [full], memories * 0)
    assert not torch.allclose(own, blank)


def test_generate_from_questions_returns_the_reasoners_top_k(tiny_model):
    documents = [CORPUS[:5], CORPUS[1:6]]
    questions = ["Where is the tower?", "Who won Nobel prizes?"]
    answers, indices = tiny_model.generate_from_questions(questions, documents, k=2)
    assert len(answers) == 2 and indices.shape == (2, 2)
    for q, docs, chosen in zip(questions, documents, indices):
        scores = cosine_scores(tiny_model.encode_queries([q]), tiny_model.compress_documents(docs),
                               tiny_model.config.retrieval_key)[0]
        assert chosen.tolist() == scores.topk(2).indices.tolist()


def test_calls_leave_no_hidden_state(tiny_model):
    tiny_model.train()
    top_k = tiny_model.config.generation_top_k
    tiny_model.generate_from_text(["Who?"], [CORPUS[:2]])
    tiny_model.generate_from_text(["Who?"], [CORPUS[:3]])
    assert tiny_model.training and tiny_model.config.generation_top_k == top_k


def test_uneven_document_lists_are_rejected(tiny_model):
    with pytest.raises(InvalidInputError, match="same number of documents"):
        tiny_model.generate_from_text(["a?", "b?"], [CORPUS[:2], CORPUS[:3]])
    with pytest.raises(InvalidInputError, match="do not fit"):
        tiny_model.generate_from_compressed_documents_and_questions(["a?"], torch.zeros(2, 3, 32))
    one_document = tiny_model.compress_documents(CORPUS[:1])[0]
    for call in (tiny_model.stream_answer, lambda q, m: tiny_model.answer([q], m)):
        with pytest.raises(InvalidInputError, match=r"lack the documents' dimension: .* memories\[None\]"):
            call("a?", one_document)
    assert tiny_model.answer(["a?"], one_document[None])


def test_only_memory_rows_of_the_embedding_receive_gradient(tiny_tokens_model):
    set_trainable(tiny_tokens_model, ["query_reasoner_adapter", "decoder_adapter"], memory_embeddings=True)
    tiny_tokens_model.train()
    states = encode_with_gradients(tiny_tokens_model, ["Where is Paris?"], "query_reasoner_adapter")[0]
    prompt = question_prompt(tiny_tokens_model.tokenizer, "Who?", 1, tiny_tokens_model.document_placeholder)
    full = question_prompt(tiny_tokens_model.tokenizer, "Who?", 1, tiny_tokens_model.document_placeholder, "Paris")
    loss = -completion_log_likelihood(tiny_tokens_model, [prompt], [full], states.unsqueeze(1))[0].sum()
    loss.backward()
    grad = tiny_tokens_model.lm.get_input_embeddings().weight.grad
    rows_with_grad = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert rows_with_grad and rows_with_grad <= set(tiny_tokens_model.mem_token_ids)
    grads = {n: p.grad for n, p in tiny_tokens_model.lm.named_parameters() if "lora_B" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "query_reasoner" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "decoder_adapter" in n)
    assert all(g is None for n, g in grads.items() if "encoder_adapter" in n)


def test_untrained_adapters_leave_the_base_model_unchanged_and_trained_ones_do_not(tiny_config):
    model = ClaraModel(tiny_config, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = model.compress_documents(CORPUS[:1])
        with model.lm.disable_adapter():
            plain = model.compress_documents(CORPUS[:1])
    assert torch.allclose(a, plain, atol=1e-6)  # a fresh LoRA adapter is the identity
    randomize_adapters(model)
    assert not torch.allclose(a, model.compress_documents(CORPUS[:1]))




def test_reading_text_leaves_the_chosen_adapters_trainable(tiny_model):
    # peft's switch back from the base weights made the active adapter alone trainable: the
    # query reasoner a stage trained stopped training, and the decoder started
    from clara_plugins.passes import set_trainable, text_weights

    set_trainable(tiny_model, ["query_reasoner_adapter"])
    with text_weights(tiny_model):
        pass
    trains = {name.split(".")[-2] for name, p in tiny_model.lm.named_parameters() if "lora_" in name and p.requires_grad}
    assert trains == {"query_reasoner_adapter"}


def test_a_flat_list_of_documents_is_named_as_such(tiny_model):
    # it read "every question needs the same number of documents, got [4, 12]": the texts' lengths
    with pytest.raises(InvalidInputError, match="one list of documents per question"):
        tiny_model.generate_from_text(["Who?", "Where?"], ["Paris is big", "Rome"])


def test_an_answer_cut_between_a_characters_bytes_ends_before_it():
    # a byte-level tokenizer decodes the first of a character's two bytes as U+FFFD: the answer ended in it
    import torch

    from clara_plugins.generation import collect_answers, stream_text

    class Bytes:
        def decode(self, tokens, skip_special_tokens=True):
            return bytes(tokens).decode("utf-8", errors="replace")

    cut = list("Köln".encode())[:2]  # K, then the first byte of ö
    assert collect_answers(Bytes(), iter(torch.tensor([t]) for t in cut), 1, set()) == ["K"]
    assert "".join(stream_text(Bytes(), iter(torch.tensor([t]) for t in cut), set())) == "K"


def test_a_document_window_past_the_backbones_positions_is_refused(tiny_config):
    # the decoder checked its window, the encoder did not: a model with learned positions failed on
    # an index at the first compression, a rotary one compressed from positions it never saw
    with pytest.raises(ValueError, match="frames a document in 8195 positions, past .* context window of 8192"):
        ClaraModel(dataclasses.replace(tiny_config, doc_max_length=8192), device="cpu")  # <ENC> bos ... eos
    ClaraModel(dataclasses.replace(tiny_config, doc_max_length=7728), device="cpu")
    with pytest.raises(ValueError, match="frames a document in 8214 positions"):  # and its 483 <MEM> positions
        ClaraModel(dataclasses.replace(tiny_config, doc_max_length=7728, memory_design="tokens"), device="cpu")


def test_a_document_window_is_checked_before_its_memory_tokens_join_the_vocabulary(tiny_config, monkeypatch):
    # a checkpoint header's doc_max_length of 10**12 at rate 1 added as many tokens and embedding
    # rows, exhausting memory, before the window refused it
    monkeypatch.setattr(ClaraModel, "_add_special_tokens", lambda self, lm: pytest.fail("tokens added first"))
    with pytest.raises(ValueError, match="past .* context window of 8192"):
        ClaraModel(dataclasses.replace(tiny_config, doc_max_length=10**12, compression_rate=1), device="cpu")


def test_a_multimodal_causal_lm_keeps_its_text_settings_in_a_config_of_their_own(tiny_base, tmp_path):
    # Gemma 3 from 4B on loads as Gemma3ForConditionalGeneration: its layers and window sit in
    # text_config, and the model failed on a missing num_hidden_layers after its weights loaded
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    model = ClaraModel(ClaraConfig(base_model=str(tmp_path / "gemma"), doc_max_length=64, max_new_tokens=4),
                       device="cpu")
    assert model.base_fingerprint["num_layers"] == 2
    assert len(model.answer(["Who?"], model.compress_documents(CORPUS[:1]).unsqueeze(0))) == 1
    with pytest.raises(InvalidInputError, match="past the model's context window of 512"):
        model.generate([" ".join(["word"] * 512)], None, 4)
    from llama_index_clara import ClaraLLM

    assert ClaraLLM(clara=model).metadata.context_window == 512  # not LlamaIndex's 2,048 fallback


def test_pooling_settings_are_refused_with_the_tokens_design(tiny_config):
    # accepted, saved and signed, but never read: two alike compressors refused each other's stores
    for setting in ({"memory_pooling": "last"}, {"memory_layer": 8}):
        with pytest.raises(ValueError, match="the tokens design reads neither"):
            dataclasses.replace(tiny_config, memory_design="tokens", **setting)


def test_memories_as_numpy_arrays_are_read_and_other_types_refused_by_name(tiny_model, tmp_path):
    # a numpy array failed on a missing tensor method; an empty 1-D tensor for "no documents" on an IndexError
    import numpy as np

    memories = tiny_model.compress_documents(CORPUS[:2])
    np.save(tmp_path / "m.npy", memories.numpy())
    saved = np.load(tmp_path / "m.npy", mmap_mode="r")
    assert tiny_model.answer(["Who?"], saved) == tiny_model.answer(["Who?"], memories)
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"], memories=saved)
    assert torch.equal(store.memories(["a", "b"]), memories.to(torch.float16))
    prompt = question_prompt(tiny_model.tokenizer, "Who?", 0, tiny_model.document_placeholder)
    assert tiny_model.generate([prompt], [torch.tensor([])]) == tiny_model.generate([prompt], [None])
    with pytest.raises(InvalidInputError, match="compressed documents must be a tensor or numpy array .*got a list"):
        tiny_model.answer(["Who?"], memories.tolist())


def test_an_answer_after_a_prompt_ending_in_a_space_trains_its_first_token(tmp_path):
    # "assistant: " gave its space to the answer's first token ("Ġthe"): counting the prompt's
    # own tokens started the labels one token late, and the first answer token never trained;
    # the prompt now ends before the space, so that the generator writes "Ġthe" as trained
    from transformers import AutoTokenizer

    from clara_plugins.passes import completion_log_probs

    folder = build_tiny_base_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer.save_pretrained(folder)
    model = ClaraModel(ClaraConfig(base_model=str(folder), compression_rate=16, doc_max_length=64), device="cpu")
    prompt = question_prompt(model.tokenizer, "Who?", 0, model.document_placeholder)
    full = question_prompt(model.tokenizer, "Who?", 0, model.document_placeholder, "the river")
    assert prompt.endswith("assistant:") and full.startswith(prompt + " the river")
    labels = completion_log_probs(model, [prompt], [full])[1][0]
    assert model.tokenizer.decode(labels[labels != -100]) == " the river\n" + model.tokenizer.eos_token


def test_a_template_that_reads_enable_thinking_answers_without_thinking(tmp_path):
    # Qwen3's opens the answer with an empty think block only when told not to think: every
    # prompt asked for reasoning first, and a teacher's replies began with it
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "base"))
    tokenizer.chat_template = THINK_TEMPLATE.replace(
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
        "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    prompt = question_prompt(tokenizer, "Who?", 1, "<d>")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert question_prompt(tokenizer, "Who?", 1, "<d>", "Curie").startswith(prompt + "Curie<|im_end|>\n")


def test_memories_that_are_not_finite_floats_and_a_config_that_is_no_config_are_refused(tiny_model):
    # NaN memories answered "", integer ones were cast; a path given as the config failed on dataclasses.replace
    shape = (1, 1, tiny_model.config.n_mem_tokens, tiny_model.hidden_size)
    with pytest.raises(InvalidInputError, match="must be finite"):
        tiny_model.answer(["Who?"], torch.full(shape, float("nan")))
    with pytest.raises(InvalidInputError, match="must be finite"):
        tiny_model.answer(["Who?"], torch.full(shape, float("inf")))
    for dtype in (torch.long, torch.float8_e4m3fn):  # float8: a bare NotImplementedError from isfinite
        with pytest.raises(InvalidInputError, match=f"must be floating point .*, got {dtype}"):
            tiny_model.answer(["Who?"], torch.ones(shape).to(dtype))
    with pytest.raises(InvalidInputError, match="config must be a ClaraConfig, got str 'runs/x': load a checkpoint "
                                                "with ClaraModel.from_pretrained"):
        ClaraModel("runs/x")


def test_a_model_deep_copies_and_pickles_with_a_lock_of_its_own(tiny_model):
    # its lock could not be pickled: copy.deepcopy and pickle failed on "_thread.RLock"
    import copy
    import pickle

    shape = (1, 1, tiny_model.config.n_mem_tokens, tiny_model.hidden_size)
    memories = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for copied in (copy.deepcopy(tiny_model), pickle.loads(pickle.dumps(tiny_model))):
        assert copied._lock is not tiny_model._lock
        assert copied.answer(["Who?"], memories) == tiny_model.answer(["Who?"], memories)


def test_a_base_model_clara_cannot_read_is_refused_by_name(tmp_path, monkeypatch):
    # no pad and no eos: built, then every compression failed on a bare TypeError; OPT-350m's
    # narrower embeddings: a raw shape mismatch at the first compression; remote code: transformers'
    # advice to pass trust_remote_code, which nothing here passes
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from clara_plugins import backbone

    bare = build_tiny_base_model(tmp_path / "bare")
    tokenizer = AutoTokenizer.from_pretrained(bare)
    tokenizer.pad_token, tokenizer.eos_token = None, None
    tokenizer.save_pretrained(bare)
    with pytest.raises(ValueError, match="neither a padding nor an end-of-sequence token"):
        ClaraModel(ClaraConfig(base_model=str(bare), compression_rate=16, doc_max_length=64), device="cpu")
    opt = tmp_path / "opt"
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base_model(tmp_path / "words"))
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)).save_pretrained(opt)
    tokenizer.save_pretrained(opt)
    with pytest.raises(ValueError, match="has layers 32 wide and embeddings 16, so only the last layer's"):
        ClaraModel(ClaraConfig(base_model=str(opt), compression_rate=16, doc_max_length=64, memory_layer=1),
                   device="cpu")
    model = ClaraModel(ClaraConfig(base_model=str(opt), compression_rate=16, doc_max_length=64), device="cpu")  # the last
    model.config.memory_layer = 1  # and saved so, it would not load
    with pytest.raises(CheckpointError, match="memory_layer=1 .the base model has layers 32 wide and embeddings 16"):
        model.save_pretrained(tmp_path / "opt-clara")
    assert not (tmp_path / "opt-clara").exists()

    # MPT: built and compressed, then every answer failed inside peft, which refuses inputs_embeds for it
    from transformers import MptConfig, MptForCausalLM

    mpt = tmp_path / "mpt"
    MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=len(tokenizer), max_seq_len=512,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(mpt)
    tokenizer.save_pretrained(mpt)
    with pytest.raises(ValueError, match="is an MPT model, whose peft forward refuses inputs_embeds"):
        ClaraModel(ClaraConfig(base_model=str(mpt), compression_rate=16, doc_max_length=64), device="cpu")
    # Mamba: peft's refusal advised editing target_modules, which CLaRa has no setting for
    from transformers import MambaConfig, MambaForCausalLM

    mamba = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(mamba)
    tokenizer.save_pretrained(mamba)
    with pytest.raises(ValueError, match="mamba' is a state-space model, whose layers LoRA cannot adapt"):
        ClaraModel(ClaraConfig(base_model=str(mamba), compression_rate=16, doc_max_length=64), device="cpu")
    # recurrent models and per-layer token embeddings: compressed, then every answer failed on a bare
    # KeyError (RecurrentGemma, RWKV) or read memories without a part of the model (Gemma 3n)
    from transformers import (Gemma3nForCausalLM, Gemma3nTextConfig, RecurrentGemmaConfig, RecurrentGemmaForCausalLM,
                              RwkvConfig, RwkvForCausalLM)

    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    unreadable = {
        "recurrent model, which returns no key-value cache": [
            RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, lru_width=32, attention_window_size=16,
                block_types=["recurrent", "attention"], **ids)),
            RwkvForCausalLM(RwkvConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       attention_hidden_size=32, intermediate_size=64, context_length=512, **ids))],
        "per-layer token embeddings": [Gemma3nForCausalLM(Gemma3nTextConfig(
            vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
            hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=0,
            layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0], **ids))],
    }
    for message, models in unreadable.items():
        for lm in models:
            folder = tmp_path / lm.config.model_type
            lm.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            with pytest.raises(ValueError, match=message):
                ClaraModel(ClaraConfig(base_model=str(folder), compression_rate=16, doc_max_length=64), device="cpu")
    # a clone without Git LFS, and a tokenizer cut short: safetensors' "header too large" and a bare
    # JSONDecodeError named neither the model nor the file
    pointer = build_tiny_base_model(tmp_path / "pointer")
    (pointer / "tf_model.h5").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    backbone.load_base_model(str(pointer))  # the safetensors fetched alone: TensorFlow's pointer is never read
    weights = next(pointer.glob("*.safetensors"))
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(OSError, match=f"{weights} is a Git LFS pointer, not the file it names"):
        backbone.load_base_model(str(pointer))
    cut = build_tiny_base_model(tmp_path / "cut")
    (cut / "tokenizer.json").write_text((cut / "tokenizer.json").read_text()[:40])
    with pytest.raises(OSError, match="base model .*cut' has a damaged file \\(JSONDecodeError"):
        backbone.load_base_model(str(cut))

    remote = build_tiny_base_model(tmp_path / "remote")  # a model whose class is its repository's own code
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="clara-remote-test", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                            "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run the code"))
    for load in (backbone.load_base_model, backbone.check_base_model):
        with pytest.raises(ValueError, match="runs code of its own \\(trust_remote_code\\), which this library does"):
            load(str(remote))


def test_a_base_model_folder_without_a_config_or_a_tokenizer_is_named_in_one_line(tiny_model, tmp_path, monkeypatch):
    # transformers' five lines on a tokenizer it cannot build named neither the folder nor what it lacked
    import huggingface_hub

    from clara_plugins import backbone

    (tmp_path / "empty").mkdir()
    tiny_model.save_pretrained(tmp_path / "checkpoint")
    config_alone = build_tiny_base_model(tmp_path / "config-alone")
    for path in config_alone.iterdir():
        if path.name != "config.json":
            path.unlink()
    for load in (backbone.load_base_model, backbone.check_base_model):
        with pytest.raises(OSError, match="empty' is a folder without a config.json: not a Hugging Face model folder"):
            load(str(tmp_path / "empty"))
        with pytest.raises(OSError, match="a folder without a config.json: a CLaRa checkpoint: load it as one"):
            load(str(tmp_path / "checkpoint"))  # given where its base model goes
        with pytest.raises(ValueError, match="^base model '.*config-alone': Couldn't instantiate the backend tokenizer")\
                as refused:
            load(str(config_alone))
        assert "\n" not in str(refused.value)
        # a hub id neither cached nor reachable: transformers' own lines ("Check your internet connection...")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # not 27 s of retries
        with pytest.raises(OSError, match="^could not load base model 'clara-test/no-such-model'") as refused:
            load("clara-test/no-such-model")
        assert "\n" not in str(refused.value)


def test_memories_past_an_fp16_models_range_are_refused_and_stored_ones_may_carry_gradients(tiny_config):
    # finite in float32, they became inf in an fp16 model and answered garbage; memories that
    # carried gradients failed on torch's "Can't call numpy() on Tensor that requires grad"
    half = ClaraModel(tiny_config, device="cpu", dtype=torch.float16)
    shape = (1, 1, half.config.n_mem_tokens, half.hidden_size)
    with pytest.raises(InvalidInputError, match="memories must be finite in the model's torch.float16"):
        half.answer(["Who?"], torch.full(shape, 1e5))
    store = MemoryStore(half)
    memories = half.compress_documents(CORPUS[:2]).float().requires_grad_()
    store.upsert(CORPUS[:2], memories=memories)
    assert torch.equal(store.memories(store.all_ids()), memories.detach().half().float())
