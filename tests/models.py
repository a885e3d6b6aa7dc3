"""Tiny random models for the tests: an MLP, a BERT with a classification head, a GPT-2 (Conv1D),
a Llama and a small CNN. All are seeded and run in milliseconds."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(inputs)))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, kernel_size=3, padding=1, stride=1)
        self.conv2 = nn.Conv2d(4, 5, kernel_size=2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.head(self.pool(hidden).flatten(1))


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def text_batches(count: int = 3, batch_size: int = 4, length: int = 7, classes: int = 3, seed: int = 0,
                 vocab: int = 50) -> list[dict[str, torch.Tensor]]:
    """Classification batches with right padding of random lengths (at least 2 real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, vocab, (batch_size, length), generator=generator)
        lengths = torch.randint(2, length + 1, (batch_size,), generator=generator)
        attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        input_ids = input_ids * attention_mask
        labels = torch.randint(0, classes, (batch_size,), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def lm_batches(count: int = 3, batch_size: int = 3, length: int = 8, seed: int = 0,
               vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches: right padding, and a prompt whose labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, vocab, (batch_size, length), generator=generator)
        lengths = torch.randint(4, length + 1, (batch_size,), generator=generator)
        attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        prompt = torch.randint(1, 3, (batch_size,), generator=generator)
        labels = input_ids.clone()
        labels[torch.arange(length)[None, :] < prompt[:, None]] = -100
        labels[attention_mask == 0] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def pair_batches(count: int = 3, batch_size: int = 5, d_in: int = 6, classes: int = 3,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, d_in, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(count)]


def image_batches(count: int = 2, batch_size: int = 3, classes: int = 3,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 2, 6, 6, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(count)]


# A ChatML template like SmolLM2's (without its default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_CORPUS = [
    "Sort the words alphabetically: stone apple river -> apple river stone",
    "Reverse the words: green music paper -> paper music green",
    "What is two plus two? Four. The capital of France is Paris.",
    "system user assistant hello there, how are you today?",
]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer (GPT-2/SmolLM2 style) with ~300 tokens, trained in milliseconds.

    EOS is `<|endoftext|>`; there is no pad token (like most causal LMs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=tie_word_embeddings, initializer_range=0.2)
    return LlamaForCausalLM(config).to(dtype).eval()


def save_causal_lm(folder, model, tokenizer):
    """A model folder as `fisherlora init` and `from_pretrained` read it: weights, config, tokenizer."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
